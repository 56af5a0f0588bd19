//! FQDN egress, the pure part: which domain class a DNS name gets at an endpoint, and what a
//! DNS answer teaches (`answer`).
use crate::model::cluster::domain_matches;
use crate::state::DomainTable;

impl DomainTable {
    /// The (class, audit view's class) for a DNS name (0: none), or `None` if no pattern
    /// matches it.
    pub fn classes_of(&self, name: &str) -> Option<(u32, u32)> {
        let class = class_of(&self.classes, name);
        let audit = class_of(&self.audit_classes, name);
        (class != 0 || audit != 0).then_some((class, audit))
    }

    /// Does any pattern match `name`?
    pub fn matches(&self, name: &str) -> bool {
        self.classes_of(name).is_some()
    }
}

/// The class of exactly the patterns (of `classes`) that match `name`, 0 if none does.
fn class_of(classes: &[(Vec<String>, u32)], name: &str) -> u32 {
    let mut matched: Vec<&str> = classes
        .iter()
        .flat_map(|(p, _)| p.iter())
        .filter(|p| domain_matches(p, name))
        .map(String::as_str)
        .collect();
    matched.sort_unstable();
    matched.dedup();
    if matched.is_empty() {
        return 0;
    }
    classes
        .iter()
        .find(|(p, _)| p.iter().map(String::as_str).eq(matched.iter().copied()))
        .map_or(0, |(_, c)| *c)
}

// ---------------------------------------------------------------------------------------------
// What a DNS answer teaches
// ---------------------------------------------------------------------------------------------

use std::net::IpAddr;

use simple_dns::{CLASS, OPCODE, PacketFlag, QCLASS, QTYPE, RCODE, TYPE, rdata::RData};

/// CNAMEs followed from the question, at most.
pub const MAX_CHAIN: usize = 16;
/// Addresses taken from one answer, at most.
pub const MAX_ADDRESSES: usize = 512;

/// A DNS answer's lesson: the question's name (lower case, no trailing dot), the CNAME chain
/// from it, and the addresses it resolved to, each with the lowest TTL along its chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub name: String,
    pub chain: Vec<String>,
    pub addresses: Vec<(IpAddr, u32)>,
    /// The message had the TC bit: what it holds is learned, the client retries over TCP.
    pub truncated: bool,
}

/// Why an answer teaches nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("not a DNS message: {0}")]
    Malformed(String),
    #[error("not a response to a standard query")]
    NotAnAnswer,
    #[error("{0} questions (one is answered)")]
    Questions(usize),
    #[error("not an IN A or AAAA question")]
    QuestionType,
    #[error("response code {0}")]
    Rcode(u8),
}

/// Normalizes a DNS name as patterns are: lower case, no trailing dot.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Reads a DNS message (a UDP payload, or a TCP one without its length prefix). Strict, as
/// Cilium is: one IN A/AAAA question, NOERROR, and in the answer section only the records
/// whose owner is the question's name or the CNAME chain from it; authority and additional
/// records teach nothing, nor do IPv4-mapped IPv6 addresses.
pub fn answer(msg: &[u8]) -> Result<Answer, AnswerError> {
    let p = simple_dns::Packet::parse(msg).map_err(|e| AnswerError::Malformed(e.to_string()))?;
    if !p.has_flags(PacketFlag::RESPONSE) || p.opcode() != OPCODE::StandardQuery {
        return Err(AnswerError::NotAnAnswer);
    }
    if p.questions.len() != 1 {
        return Err(AnswerError::Questions(p.questions.len()));
    }
    let q = &p.questions[0];
    let wanted = match q.qtype {
        QTYPE::TYPE(TYPE::A) => TYPE::A,
        QTYPE::TYPE(TYPE::AAAA) => TYPE::AAAA,
        _ => return Err(AnswerError::QuestionType),
    };
    if q.qclass != QCLASS::CLASS(CLASS::IN) {
        return Err(AnswerError::QuestionType);
    }
    if p.rcode() != RCODE::NoError {
        return Err(AnswerError::Rcode(p.rcode() as u8));
    }
    let name = normalize(&q.qname.to_string());
    let mut current = name.clone();
    let mut chain = Vec::new();
    let mut chain_ttl = u32::MAX;
    let mut addresses = Vec::new();
    // Follow the chain: each round takes the records owned by the current name.
    for _ in 0..=MAX_CHAIN {
        let mut next = None;
        for rr in p.answers.iter().filter(|rr| rr.class == CLASS::IN) {
            if normalize(&rr.name.to_string()) != current {
                continue;
            }
            match &rr.rdata {
                RData::CNAME(target) if next.is_none() => {
                    next = Some((normalize(&target.0.to_string()), rr.ttl))
                }
                RData::A(a) if wanted == TYPE::A && addresses.len() < MAX_ADDRESSES => addresses
                    .push((
                        IpAddr::V4(std::net::Ipv4Addr::from(a.address)),
                        rr.ttl.min(chain_ttl),
                    )),
                RData::AAAA(a) if wanted == TYPE::AAAA && addresses.len() < MAX_ADDRESSES => {
                    let ip = std::net::Ipv6Addr::from(a.address);
                    if ip.to_ipv4_mapped().is_none() {
                        addresses.push((IpAddr::V6(ip), rr.ttl.min(chain_ttl)));
                    }
                }
                _ => {}
            }
        }
        match next {
            // Addresses end the chain; a name is followed once (a loop ends the walk).
            Some((target, ttl))
                if addresses.is_empty() && target != name && !chain.contains(&target) =>
            {
                chain_ttl = chain_ttl.min(ttl);
                chain.push(target.clone());
                current = target;
            }
            _ => break,
        }
    }
    Ok(Answer {
        name,
        chain,
        addresses,
        truncated: p.has_flags(PacketFlag::TRUNCATION),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{Name, Packet, Question, ResourceRecord, rdata};

    fn reply(q: &str, qtype: TYPE, records: Vec<ResourceRecord<'_>>) -> Vec<u8> {
        let mut p = Packet::new_reply(7);
        p.questions.push(Question::new(
            Name::new_unchecked(q),
            QTYPE::TYPE(qtype),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.answers = records;
        p.build_bytes_vec_compressed().unwrap()
    }

    fn a<'a>(owner: &'a str, ip: [u8; 4], ttl: u32) -> ResourceRecord<'a> {
        ResourceRecord::new(
            Name::new_unchecked(owner),
            CLASS::IN,
            ttl,
            RData::A(rdata::A {
                address: u32::from_be_bytes(ip),
            }),
        )
    }

    fn cname<'a>(owner: &'a str, target: &'a str, ttl: u32) -> ResourceRecord<'a> {
        ResourceRecord::new(
            Name::new_unchecked(owner),
            CLASS::IN,
            ttl,
            RData::CNAME(rdata::CNAME(Name::new_unchecked(target))),
        )
    }

    fn ips(a: &Answer) -> Vec<String> {
        a.addresses
            .iter()
            .map(|(ip, ttl)| format!("{ip}/{ttl}"))
            .collect()
    }

    #[test]
    fn a_records_of_the_question_are_learned_with_their_ttls() {
        let msg = reply(
            "Api.Example.TEST",
            TYPE::A,
            vec![
                a("api.example.test", [198, 51, 100, 1], 30),
                a("API.example.test.", [198, 51, 100, 2], 5),
                a("other.test", [198, 51, 100, 9], 30),
            ],
        );
        let got = answer(&msg).unwrap();
        assert_eq!(got.name, "api.example.test");
        assert_eq!(ips(&got), ["198.51.100.1/30", "198.51.100.2/5"]);
    }

    #[test]
    fn a_cname_chain_is_followed_in_order_and_its_lowest_ttl_kept() {
        let msg = reply(
            "www.alias.test",
            TYPE::A,
            vec![
                cname("www.alias.test", "edge.cdn.test", 10),
                cname("edge.cdn.test", "real.cdn.test", 300),
                a("real.cdn.test", [203, 0, 113, 7], 60),
                // Owned by a name off the chain: ignored.
                a("evil.test", [203, 0, 113, 66], 60),
            ],
        );
        let got = answer(&msg).unwrap();
        assert_eq!(got.chain, ["edge.cdn.test", "real.cdn.test"]);
        assert_eq!(ips(&got), ["203.0.113.7/10"]);
    }

    #[test]
    fn a_cname_loop_ends_the_walk() {
        let msg = reply(
            "a.loop.test",
            TYPE::A,
            vec![
                cname("a.loop.test", "b.loop.test", 10),
                cname("b.loop.test", "a.loop.test", 10),
            ],
        );
        let got = answer(&msg).unwrap();
        assert!(got.addresses.is_empty());
        assert_eq!(got.chain, ["b.loop.test"]);
    }

    #[test]
    fn what_is_not_an_answer_teaches_nothing() {
        let mut q = Packet::new_query(1);
        q.questions.push(Question::new(
            Name::new_unchecked("a.test"),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let query = q.build_bytes_vec().unwrap();
        assert_eq!(answer(&query), Err(AnswerError::NotAnAnswer));
        assert!(matches!(answer(&[1, 2, 3]), Err(AnswerError::Malformed(_))));
        let mx = reply("a.test", TYPE::MX, vec![]);
        assert_eq!(answer(&mx), Err(AnswerError::QuestionType));
        let mut nx = Packet::new_reply(1);
        nx.questions.push(Question::new(
            Name::new_unchecked("a.test"),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        *nx.rcode_mut() = RCODE::NameError;
        assert_eq!(
            answer(&nx.build_bytes_vec().unwrap()),
            Err(AnswerError::Rcode(3))
        );
    }

    #[test]
    fn an_a_question_learns_no_aaaa_and_mapped_addresses_are_ignored() {
        let aaaa = |owner: &'static str, ip: std::net::Ipv6Addr| {
            ResourceRecord::new(
                Name::new_unchecked(owner),
                CLASS::IN,
                30,
                RData::AAAA(rdata::AAAA {
                    address: u128::from(ip),
                }),
            )
        };
        let msg = reply(
            "v6.test",
            TYPE::AAAA,
            vec![
                aaaa("v6.test", "2001:db8::1".parse().unwrap()),
                aaaa("v6.test", "::ffff:198.51.100.1".parse().unwrap()),
                a("v6.test", [198, 51, 100, 2], 30),
            ],
        );
        assert_eq!(ips(&answer(&msg).unwrap()), ["2001:db8::1/30"]);
    }

    /// Mutated and truncated answers (bytes of a name or a compression pointer, counts, types):
    /// never a panic, and never more than the bounds.
    #[test]
    fn mutated_answers_never_panic_and_stay_bounded() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let base = reply(
            "www.alias.test",
            TYPE::A,
            vec![
                cname("www.alias.test", "edge.cdn.test", 10),
                a("edge.cdn.test", [203, 0, 113, 7], 60),
                a("evil.test", [203, 0, 113, 66], 60),
            ],
        );
        let mut learned = 0;
        for _ in 0..50_000 {
            let mut m = base.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..m.len());
                m[i] = rng.random();
            }
            if rng.random_bool(0.2) {
                m.truncate(rng.random_range(0..m.len()));
            }
            if let Ok(ans) = answer(&m) {
                assert!(ans.chain.len() <= MAX_CHAIN && ans.addresses.len() <= MAX_ADDRESSES);
                learned += ans.addresses.len();
            }
        }
        assert!(learned > 0, "no mutation left an answer to learn from");
    }

    fn table(classes: &[(&[&str], u32)]) -> DomainTable {
        DomainTable {
            classes: classes
                .iter()
                .map(|(p, c)| (p.iter().map(|s| s.to_string()).collect(), *c))
                .collect(),
            audit_classes: Vec::new(),
        }
    }

    #[test]
    fn a_name_gets_the_class_of_exactly_the_patterns_it_matches() {
        let t = table(&[
            (&["*.example.test", "api.example.test"], 1),
            (&["*.example.test"], 2),
            (&["*.b.example.test", "*.example.test"], 3),
        ]);
        assert_eq!(t.classes_of("API.example.test."), Some((1, 0)));
        assert_eq!(t.classes_of("www.example.test"), Some((2, 0)));
        assert_eq!(t.classes_of("x.b.example.test"), Some((3, 0)));
        assert_eq!(t.classes_of("example.test"), None);
        assert_eq!(t.classes_of("badexample.test"), None);
    }
}
