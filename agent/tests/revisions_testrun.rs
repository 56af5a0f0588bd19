//! Endpoint revisions never repeat: a conntrack entry is "current" only for the endpoint and
//! the policy change it was checked against. Found by `palisade-fuzz` (seed 1, packet 170 296):
//! an endpoint id that moved to another interface (a pod recreated under the same name) lost
//! its revision when the old interface's entry was removed, counted again from 1, and a flow
//! allowed at revision 2 passed unchecked after a later change brought the endpoint back to
//! revision 2 and isolated it. Real programs, BPF_PROG_TEST_RUN; needs root (CI=true: no skip).
mod support;

use palisade_common::*;
use palisade_datapath::loader::{FROM_POD, TO_POD};
use palisade_policy::state::DesiredState;
use support::{
    ACK, PEER, POD, SYN, TC_ACT_OK as OK, TC_ACT_SHOT as SHOT, endpoint_state, load,
    private_interfaces, require_root, tcp4, test_run_on,
};

#[test]
fn an_endpoint_moving_interface_never_reuses_a_revision() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(1);
    let (dp, mut w) = load();
    let (x, y) = (ifs[0], ifs[1]);
    // The endpoint on x, then (same pod, same id, new interface) on y.
    w.apply(&endpoint_state(x, 0, []));
    w.apply(&endpoint_state(y, 0, []));
    // A flow while the pod is not isolated.
    assert_eq!(
        test_run_on(&dp, TO_POD, y, &tcp4(PEER, POD, 4000, 9000, SYN)),
        OK
    );
    // An unrelated change, then isolation with nothing allowing the flow.
    w.apply(&endpoint_state(y, 0, [80]));
    w.apply(&endpoint_state(
        y,
        EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS,
        [80],
    ));
    let revisions: Vec<u32> = w.applied().endpoints.values().map(|e| e.revision).collect();
    assert_eq!(
        test_run_on(&dp, TO_POD, y, &tcp4(PEER, POD, 4000, 9000, ACK)),
        SHOT,
        "the established flow is re-checked and revoked (revisions {revisions:?})"
    );
    assert_eq!(
        test_run_on(&dp, FROM_POD, y, &tcp4(POD, PEER, 9000, 4000, ACK)),
        SHOT,
        "its replies too"
    );
}

#[test]
fn revisions_stay_monotonic_across_removal() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(1);
    let (_dp, mut w) = load();
    let y = ifs[0];
    let mut seen = Vec::new();
    for round in 0..4u16 {
        w.apply(&endpoint_state(y, EP_ISOLATED_INGRESS, [80, 81 + round]));
        seen.push(w.applied().endpoints[&y].revision);
        // The pod goes away and comes back (same name: same endpoint id).
        w.apply(&DesiredState::default());
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, seen, "revisions only grow, never repeat: {seen:?}");
}

/// A restarted agent keeps the endpoint ids it finds pinned (its conntrack entries are keyed by
/// them): here the pod that had id 2 keeps it although it is now the only pod (a fresh compiler
/// would number it 1).
#[test]
fn a_restarted_compiler_keeps_adopted_endpoint_ids() {
    use palisade_policy::compile::{Compiler, LocalEndpoint};
    use palisade_policy::model::Store;
    use palisade_policy::state::PodRef;
    let pod = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: d}}\n\
             status: {{podIP: '{ip}'}}\n"
        )
    };
    let text = [pod("x", "10.0.0.1"), pod("y", "10.0.0.2")].join("---\n");
    let store = Store::from_objects(palisade_policy::manifest::parse_str(&text).unwrap());
    let ep = |name: &str, ifindex| LocalEndpoint {
        pod: PodRef {
            namespace: "d".into(),
            name: name.into(),
        },
        ifindex,
    };
    let mut first = Compiler::default();
    let s = first.compile(&store, &[ep("x", 10), ep("y", 11)], &[]);
    let y_id = s.endpoints[&11].id;
    assert_ne!(y_id, s.endpoints[&10].id);

    // x is gone; a new agent adopts y's id from the pinned ENDPOINTS map.
    let mut second = Compiler::default();
    assert!(second.adopt_endpoint_id(&ep("y", 11).pod, y_id));
    let s2 = second.compile(&store, &[ep("y", 11)], &[]);
    assert_eq!(s2.endpoints[&11].id, y_id, "y keeps its id");
    // A pod new to this agent gets a fresh id, never an adopted one.
    let s3 = second.compile(&store, &[ep("x", 12), ep("y", 11)], &[]);
    assert_eq!(s3.endpoints[&11].id, y_id);
    assert_ne!(s3.endpoints[&12].id, y_id);
    assert_eq!(
        s3.endpoint_addrs.len(),
        2,
        "own addresses of both endpoints"
    );
}
