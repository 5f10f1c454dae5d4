//! docs/subjects.md documents every verb of the scheduler's job API.
#[test]
fn every_api_verb_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/subjects.md")).unwrap();
    for verb in costmesh_scheduler::service::VERBS {
        assert!(
            doc.contains(&format!("| `<prefix>.api.scheduler.{verb}` |")),
            "docs/subjects.md has no row for <prefix>.api.scheduler.{verb}"
        );
    }
}
