//! Folding and scoping; what the store keeps of events is tested on every engine in
//! `store::feed_tests`.

use super::*;

fn inst(tenant: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind: Kind::OpenClawInstance,
        tenant: tenant.into(),
        project: "p".into(),
        name: name.into(),
    }
}

#[test]
fn identical_events_fold_into_one_with_a_count() {
    let e = |at, msg: &str| {
        Event::warning(inst("acme", "bot"), "ContainerRestarted", msg)
            .replica("bot-0")
            .source("agent/h1")
            .at(at)
    };
    let folded = fold(vec![
        e(1_000, "exit code 1"),
        e(2_000, "exit code 1"),
        e(3_000, "exit code 137"),
        e(4_000, "exit code 1"),
    ]);
    assert_eq!(folded.len(), 2);
    assert_eq!(
        (folded[0].count, folded[0].first_ms, folded[0].last_ms),
        (3, 1_000, 4_000)
    );
    assert_eq!(folded[1].count, 1);
    // Beyond the window, a new event.
    let late = FOLD_WINDOW.as_millis() as i64 + 10_000;
    assert_eq!(fold(vec![e(1_000, "x"), e(late, "x")]).len(), 2);
}

#[test]
fn a_tenant_sees_only_its_own_events_and_no_host_events() {
    let host = ObjectKey::cluster(Kind::Host, "h1");
    let filter = EventFilter::default();
    let acme = Scope::Tenant("acme".into());
    assert!(filter.matches(&acme, &Event::normal(inst("acme", "bot"), "X", "")));
    assert!(!filter.matches(&acme, &Event::normal(inst("other", "bot"), "X", "")));
    assert!(!filter.matches(&acme, &Event::normal(host.clone(), "NodeNotReady", "")));
    assert!(filter.matches(&Scope::Cluster, &Event::normal(host, "NodeNotReady", "")));
    let one = EventFilter {
        object: Some(parse_for("instance/bot").unwrap()),
        ..EventFilter::default()
    };
    assert!(one.matches(
        &Scope::Cluster,
        &Event::normal(inst("acme", "bot"), "X", "")
    ));
    assert!(!one.matches(
        &Scope::Cluster,
        &Event::normal(inst("acme", "bot2"), "X", "")
    ));
    assert!(parse_for("pod/x").is_err());
    assert!(parse_for("instance").is_err());
}
