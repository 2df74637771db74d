//! The conformance table (tests/conformance) on the bare tower layer: every status the table
//! expects. Each front door's own test runs the same table and compares its responses and
//! stored usage with this layer's.

use crate::conformance;

use conformance::{run, scenarios, Tower};

#[tokio::test]
async fn the_tower_layer_answers_the_table() {
    for scenario in &scenarios() {
        let outcome = run(scenario, &Tower::new, true).await;
        assert!(!outcome.usage.is_empty() || scenario.name.starts_with("missing"), "{}: {outcome:?}", scenario.name);
    }
}

#[tokio::test]
async fn usage_recorded_while_the_response_streams_is_stored() {
    let table = scenarios();
    let streaming = table.iter().find(|s| s.name.starts_with("usage recorded while")).unwrap();
    let outcome = run(streaming, &Tower::new, true).await;
    assert_eq!(outcome.responses[0].body, "ab");
    assert_eq!(outcome.usage[&("globex".to_owned(), "tokens".to_owned())], 2 * conformance::STREAM_TOKENS);
    assert_eq!(outcome.usage[&("globex".to_owned(), "requests".to_owned())], 2);
}
