//! The plugin's I/O: the API server as the kubeconfig names it, the Palisade pods, the pods a
//! command names, and each agent's CLI reached the way `kubectl exec` reaches it (the pod's
//! `exec` subresource over a WebSocket, `v5.channel.k8s.io` or `v4.channel.k8s.io`): no port
//! opened on the nodes, no privilege beyond `pods/exec` in the Palisade namespace.
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{AttachParams, ListParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::view::{AgentPod, agents_by_node, exit_code_of};

/// What the plugin could not do, naming the node, pod or object concerned.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("loading the kubeconfig{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Kubeconfig {
        path: Option<PathBuf>,
        message: String,
    },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "no Palisade agent pods in namespace {namespace} (label selector {selector}): is the DaemonSet installed (kubectl apply -k manifests/), and is this the right --palisade-namespace?"
    )]
    NoAgents { namespace: String, selector: String },
    #[error("pod {pod} not found")]
    PodNotFound { pod: String },
    #[error("pod {pod} is not scheduled on a node yet")]
    PodNotScheduled { pod: String },
    #[error("node {node} (where {pod} runs) has no Palisade agent pod")]
    NoAgentOnNode { node: String, pod: String },
    #[error("node {node} (agent pod {agent}): {message}")]
    Agent {
        node: String,
        agent: String,
        message: String,
    },
}

impl PluginError {
    fn agent(a: &AgentPod, message: impl Into<String>) -> Self {
        PluginError::Agent {
            node: a.node.clone(),
            agent: a.pod.clone(),
            message: message.into(),
        }
    }
}

/// Where the plugin looks: the API server, the Palisade namespace, how its pods are labelled
/// and which of their containers runs the agent.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    pub namespace: String,
    pub selector: String,
    pub container: String,
}

/// The kubeconfig: `path` if given (else `KUBECONFIG` or `~/.kube/config`, else the pod's
/// service account), its current context or `context`.
pub async fn connect(
    path: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<Client, PluginError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    let err = |message: String| PluginError::Kubeconfig {
        path: path.map(|p| p.to_path_buf()),
        message,
    };
    let config = match (path, context) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| err(e.to_string()))?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| err(e.to_string()))?,
        (None, None) => kube::Config::infer()
            .await
            .map_err(|e| err(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// A command's output in the agent pod, and its exit status.
#[derive(Debug)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub exit_code: i32,
}

impl ExecOutput {
    /// What the command said about its failure (its last stderr lines).
    pub fn error_text(&self) -> String {
        let text = self.stderr.trim();
        let text = text.strip_prefix("Error: ").unwrap_or(text);
        if text.is_empty() {
            format!("exit status {}", self.exit_code)
        } else {
            text.replace("\n\nCaused by:\n    ", ": ")
                .replace("\n    ", ": ")
        }
    }
}

impl Cluster {
    pub fn new(client: Client, namespace: &str, selector: &str, container: &str) -> Self {
        Cluster {
            client,
            namespace: namespace.into(),
            selector: selector.into(),
            container: container.into(),
        }
    }

    /// The agent pod of every node that has one.
    pub async fn agents(&self) -> Result<Vec<AgentPod>, PluginError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pods = api
            .list(&ListParams::default().labels(&self.selector))
            .await
            .map_err(|source| PluginError::Api {
                what: format!(
                    "listing the Palisade pods in namespace {} ({})",
                    self.namespace, self.selector
                ),
                source,
            })?;
        let agents: Vec<AgentPod> = agents_by_node(&pods.items).into_values().collect();
        if agents.is_empty() {
            return Err(PluginError::NoAgents {
                namespace: self.namespace.clone(),
                selector: self.selector.clone(),
            });
        }
        Ok(agents)
    }

    /// A workload pod (`namespace/name`).
    pub async fn pod(&self, pod: &str) -> Result<Pod, PluginError> {
        let (ns, name) = pod.split_once('/').unwrap_or(("default", pod));
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        match api.get_opt(name).await {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(PluginError::PodNotFound { pod: pod.into() }),
            Err(source) => Err(PluginError::Api {
                what: format!("looking up pod {pod}"),
                source,
            }),
        }
    }

    /// The node `pod` runs on and that node's agent.
    pub async fn agent_of(&self, pod: &str, agents: &[AgentPod]) -> Result<AgentPod, PluginError> {
        let p = self.pod(pod).await?;
        let node = super::view::node_of(&p).ok_or_else(|| PluginError::PodNotScheduled {
            pod: pod.to_string(),
        })?;
        agents
            .iter()
            .find(|a| a.node == node)
            .cloned()
            .ok_or_else(|| PluginError::NoAgentOnNode {
                node: node.to_string(),
                pod: pod.to_string(),
            })
    }

    fn attach_params(&self) -> AttachParams {
        AttachParams {
            container: Some(self.container.clone()),
            stdin: false,
            stdout: true,
            stderr: true,
            tty: false,
            max_stdout_buf_size: Some(1 << 20),
            max_stderr_buf_size: Some(1 << 16),
            ..Default::default()
        }
    }

    async fn start(
        &self,
        agent: &AgentPod,
        command: &[String],
    ) -> Result<kube::api::AttachedProcess, PluginError> {
        if !agent.running() {
            return Err(PluginError::agent(
                agent,
                format!("the agent pod is {}, not Running", agent.phase),
            ));
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        api.exec(&agent.pod, command.to_vec(), &self.attach_params())
            .await
            .map_err(|e| PluginError::agent(agent, format!("exec: {e}")))
    }

    /// Runs `command` in `agent`'s container, within `timeout`: its whole output and exit
    /// status.
    pub async fn exec(
        &self,
        agent: &AgentPod,
        command: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, PluginError> {
        let run = async {
            let mut process = self.start(agent, command).await?;
            let mut stdout = process.stdout().expect("stdout attached");
            let mut stderr = process.stderr().expect("stderr attached");
            let status = process.take_status().expect("status taken once");
            let (mut out, mut err) = (Vec::new(), Vec::new());
            // Read both while the status comes: the streams are bounded pipes.
            let (o, e, status) = tokio::join!(
                stdout.read_to_end(&mut out),
                stderr.read_to_end(&mut err),
                status
            );
            o.and(e)
                .map_err(|e| PluginError::agent(agent, format!("reading the exec stream: {e}")))?;
            let _ = process.join().await;
            let status = status.ok_or_else(|| {
                PluginError::agent(agent, "the exec stream ended without an exit status")
            })?;
            let exit_code = exit_code_of(&status).ok_or_else(|| {
                PluginError::agent(
                    agent,
                    format!(
                        "exec failed: {}",
                        status
                            .message
                            .clone()
                            .unwrap_or_else(|| format!("{status:?}"))
                    ),
                )
            })?;
            Ok(ExecOutput {
                stdout: out,
                stderr: String::from_utf8_lossy(&err).into_owned(),
                exit_code,
            })
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(PluginError::agent(
                agent,
                format!("no answer within {timeout:?}"),
            )),
        }
    }

    /// Runs `command` (a `--follow` that prints JSON lines) in `agent`'s container, calling
    /// `line` with each line of its output as it comes; returns when the command ends (an
    /// error: how it ended).
    pub async fn exec_lines(
        &self,
        agent: &AgentPod,
        command: &[String],
        mut line: impl FnMut(&str),
    ) -> PluginError {
        let mut process = match self.start(agent, command).await {
            Ok(p) => p,
            Err(e) => return e,
        };
        let stdout = process.stdout().expect("stdout attached");
        let mut stderr = process.stderr().expect("stderr attached");
        let status = process.take_status().expect("status taken once");
        let mut err = Vec::new();
        let read_lines = async {
            let mut lines = tokio_stream_lines(stdout);
            while let Some(l) = lines.next().await {
                match l {
                    Ok(l) => line(&l),
                    Err(e) => return Some(e),
                }
            }
            None
        };
        let (read_error, _, status) =
            tokio::join!(read_lines, stderr.read_to_end(&mut err), status);
        let stderr_text = String::from_utf8_lossy(&err).into_owned();
        let message = match (read_error, status.as_ref().and_then(exit_code_of)) {
            (Some(e), _) => format!("reading the exec stream: {e}"),
            (None, Some(code)) => ExecOutput {
                stdout: Vec::new(),
                stderr: stderr_text,
                exit_code: code,
            }
            .error_text(),
            (None, None) => match status.and_then(|s| s.message) {
                Some(m) => format!("exec failed: {m}"),
                None => "the exec stream ended".to_string(),
            },
        };
        PluginError::agent(agent, format!("the stream of verdicts ended: {message}"))
    }
}

/// The lines of `r` as a stream.
fn tokio_stream_lines<R: tokio::io::AsyncRead + Unpin>(
    r: R,
) -> impl futures::Stream<Item = std::io::Result<String>> + Unpin {
    let lines = BufReader::new(r).lines();
    Box::pin(futures::stream::unfold(lines, |mut lines| async move {
        match lines.next_line().await {
            Ok(Some(l)) => Some((Ok(l), lines)),
            Ok(None) => None,
            Err(e) => Some((Err(e), lines)),
        }
    }))
}
