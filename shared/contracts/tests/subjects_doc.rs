//! docs/subjects.md lists every subject family and every message.
use costmesh_contracts::subjects::{Durability, SUBJECTS};
use costmesh_contracts::AnyEvent;

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/subjects.md")).expect("docs/subjects.md")
}

#[test]
fn every_subject_is_documented_with_its_payload_and_durability() {
    let doc = doc();
    for s in SUBJECTS {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `<prefix>.{}`", s.pattern)))
            .unwrap_or_else(|| panic!("docs/subjects.md has no row for <prefix>.{}", s.pattern));
        assert!(row.contains(&format!("`{}`", s.message)), "row for {} should name {}: {row}", s.pattern, s.message);
        let durable = match s.durability {
            Durability::Core => "core NATS",
            Durability::JetStream => "JetStream",
        };
        assert!(row.contains(durable), "row for {} should say {durable}: {row}", s.pattern);
    }
}

#[test]
fn every_message_has_a_subject() {
    let doc = doc();
    for t in AnyEvent::type_names() {
        assert!(SUBJECTS.iter().any(|s| s.message == t), "{t} has no subject in SUBJECTS");
        assert!(doc.contains(&format!("`{t}`")), "{t} is not in docs/subjects.md");
    }
}
