//! Property tests at the edges: whatever bytes and headers arrive, the
//! decoders answer with an event or an explained error, never a panic; the
//! subject and name validators let nothing through that could change a
//! subject's meaning or leave a directory. A few thousand cases each.
use costmesh_contracts::headers::names;
use costmesh_contracts::subjects::{token, validate_name, validate_token};
use costmesh_contracts::v1::{JobEvent, JobEventKind};
use costmesh_contracts::{decode, decode_any, encode, AnyEvent, ContentType, EventMeta, Headers, Subjects};
use proptest::prelude::*;

fn content_type() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("application/protobuf".to_string()),
        Just("application/json".to_string()),
        Just("application/json; charset=utf-8".to_string()),
        ".{0,30}",
    ]
}

fn event_type() -> impl Strategy<Value = String> {
    let known: Vec<String> = AnyEvent::type_names();
    prop_oneof![proptest::sample::select(known), ".{0,40}"]
}

/// Arbitrary JSON, nested a few levels: structured garbage.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(serde_json::Value::Number).unwrap_or_default()),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("jobId".to_string()),
                    Just("kind".to_string()),
                    Just("node".to_string()),
                    Just("attempt".to_string()),
                    Just("time".to_string()),
                    Just("energyMj".to_string()),
                    ".{0,10}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn headers(ct: String, ty: String, time: Option<String>) -> Headers {
    let mut h = Headers::new();
    h.insert(names::CONTENT_TYPE, ct);
    h.insert(names::EVENT_TYPE, ty);
    if let Some(t) = time {
        h.insert(names::TIME, t);
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn any_bytes_decode_or_are_explained(
        ct in content_type(),
        ty in event_type(),
        time in proptest::option::of(".{0,30}"),
        payload in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        match decode_any(&headers(ct, ty, time), &payload) {
            Ok((meta, ev)) => prop_assert_eq!(meta.event_type, ev.type_name()),
            Err(e) => prop_assert!(!e.to_string().trim().is_empty()),
        }
    }

    #[test]
    fn structured_json_garbage_is_explained(value in json(), ty in event_type()) {
        let payload = serde_json::to_vec(&value).unwrap();
        let h = headers("application/json".into(), ty, None);
        if let Err(e) = decode_any(&h, &payload) {
            prop_assert!(!e.to_string().trim().is_empty());
        }
        if let Err(e) = decode::<JobEvent>(&h, &payload) {
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }

    #[test]
    fn what_is_encoded_decodes_the_same(job in ".{0,40}", node in ".{0,20}", attempt in any::<u32>(), json in any::<bool>()) {
        let ev = JobEvent { job_id: job, node, attempt, kind: JobEventKind::Started as i32, ..Default::default() };
        let ct = if json { ContentType::Json } else { ContentType::Protobuf };
        let (h, p) = encode(&ev, &EventMeta::new::<JobEvent>("fuzz", chrono::Utc::now(), ct));
        let (_, back) = decode::<JobEvent>(&h, &p).unwrap();
        prop_assert_eq!(back, ev);
    }

    #[test]
    fn a_valid_name_is_safe_as_a_subject_token_and_a_path(s in ".{0,140}") {
        if validate_name(&s).is_ok() {
            prop_assert!(!s.contains('/') && !s.contains("..") && !s.starts_with('-') && !s.is_empty());
            prop_assert_eq!(token(&s), s.clone());
            prop_assert!(std::path::Path::new(&s).components().count() == 1);
        } else {
            prop_assert!(!validate_name(&s).unwrap_err().is_empty());
        }
    }

    #[test]
    fn tokens_never_carry_wildcards_or_separators(s in ".{0,60}") {
        let t = token(&s);
        prop_assert!(!t.is_empty());
        prop_assert!(!t.contains('.') && !t.contains('*') && !t.contains('>') && !t.chars().any(char::is_whitespace));
        prop_assert!(validate_token(&t).is_ok());
        let subjects = Subjects::default();
        let subject = subjects.preemption(&s);
        prop_assert_eq!(subject.split('.').count(), 3, "one token per data value: {}", subject);
    }

    #[test]
    fn a_prefix_is_accepted_only_without_wildcards(s in ".{0,40}") {
        match Subjects::new(&s) {
            Ok(sub) => prop_assert!(!sub.prefix().contains('*') && !sub.prefix().contains('>') && !sub.prefix().is_empty()),
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }
}
