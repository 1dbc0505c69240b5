//! `Pipeline::topology`: the stages and edges of a running pipeline, with
//! their live counters, and its Mermaid and DOT pictures.

mod support;

#[path = "../examples/quickstart/orders.rs"]
#[allow(dead_code)] // the example's own items the test does not name
mod quickstart;

use std::time::Duration;

use streamz::{EdgeConfig, Map, Pipeline, Stage, StageKind, Topology};

/// The node lines' names and the edge lines of a Mermaid picture, in order.
fn mermaid_shape(mermaid: &str) -> (Vec<String>, Vec<String>) {
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    for line in mermaid.lines().skip(1).map(str::trim) {
        if line.contains("->") {
            edges.push(line.to_owned());
        } else {
            let name = line
                .split_once('"')
                .and_then(|(_, rest)| rest.split_once("<br/>"))
                .map(|(name, _)| name.to_owned())
                .unwrap_or_else(|| panic!("a node line without a label: {line}"));
            nodes.push(name);
        }
    }
    (nodes, edges)
}

#[tokio::test]
async fn the_quickstarts_picture_names_every_stage_and_edge_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let dlq = dir.path().join("dlq.jsonl");
    let run = quickstart::run(&dlq);
    let (pipeline, batches) = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the quickstart finishes")
        .unwrap();
    assert!(!batches.is_empty());
    let topology = pipeline.topology();
    let mermaid = topology.to_mermaid();
    let (nodes, edges) = mermaid_shape(&mermaid);
    assert_eq!(
        nodes,
        [
            "iter",
            "try_map",
            "validate",
            "price",
            "enrich",
            "throttle",
            "batcher",
            "dead_letter_queue"
        ],
        "{mermaid}"
    );
    // Fused steps run in the task of the stage that reads them; every
    // other edge is a channel, empty once the run is over.
    let batcher_edge = topology.edges[6].queue.expect("a channel").capacity;
    assert_eq!(
        edges,
        [
            "s0 -.->|fused| s1".to_owned(),
            "s1 -.->|fused| s2".to_owned(),
            "s2 -->|0/1024| s3".to_owned(),
            "s3 -->|0/1024| s4".to_owned(),
            "s4 -->|0/1024| s5".to_owned(),
            "s5 -->|0/1024| s6".to_owned(),
            format!("s6 -->|0/{batcher_edge}| s7"),
        ],
        "{mermaid}"
    );
    // The labels carry the live counters.
    assert!(mermaid.contains(r#"s0(["iter<br/>out 9"])"#), "{mermaid}");
    // (How many batches the batcher makes depends on timing; the
    // dead-lettered count does not.)
    let dlq = mermaid.lines().find(|l| l.contains("s7[")).unwrap();
    assert!(
        dlq.starts_with("    s7[\"dead_letter_queue<br/>in ")
            && dlq.ends_with(" · dead-lettered 5\"]"),
        "{mermaid}"
    );
    let kinds: Vec<StageKind> = topology.stages.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds[..3],
        [StageKind::Source, StageKind::Fused, StageKind::Task]
    );
    // The DOT picture has the same nodes and edges.
    let dot = topology.to_dot();
    assert_eq!(dot.matches(" [label=").count(), 8 + 5, "{dot}");
    assert_eq!(dot.matches(" -> ").count(), 7, "{dot}");
    assert!(
        dot.contains("s1 -> s2 [style=dashed, label=\"fused\"];"),
        "{dot}"
    );
    pipeline.join().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_full_edge_shows_what_it_holds_while_nobody_reads() {
    let pipeline = Pipeline::with_edge(EdgeConfig::new(8, 4));
    let flow = pipeline
        .iter(0..100)
        .pipe(Stage::new("double", Map::new(|x: &i32| x * 2)))
        .pipe(Stage::new("inc", Map::new(|x: &i32| x + 1)));
    support::settle().await;
    // Nobody reads `inc`'s output: its channel fills, `inc` waits with a
    // chunk in hand, and the channel from `double` to `inc` fills too.
    let topology = pipeline.topology();
    let queues: Vec<_> = topology.edges.iter().map(|e| e.queue).collect();
    assert_eq!(queues[0], None, "iter is fused into double's task");
    let full = queues[1].expect("double has a task and a channel");
    assert_eq!(
        (full.held, full.capacity),
        (8, 8),
        "{}",
        topology.to_mermaid()
    );
    assert!(topology.to_mermaid().contains("s1 -->|8/8| s2"));
    drop(flow);
    pipeline.join().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn fan_out_and_fan_in_draw_every_branch() {
    let pipeline = Pipeline::new();
    let [a, b] = pipeline.iter(1..=6).broadcast();
    let a = a.pipe(Stage::new("left", Map::new(|x: &i32| x + 100)));
    let b = b.pipe(Stage::new("right", Map::new(|x: &i32| x + 200)));
    let out = streamz::merge([a, b]).collect().await;
    assert_eq!(out.len(), 12);
    let topology = pipeline.topology();
    let name = |i: usize| topology.stages[i].name.as_str();
    let edges: Vec<(&str, &str)> = topology
        .edges
        .iter()
        .map(|e| (name(e.from), name(e.to)))
        .collect();
    assert_eq!(
        edges,
        [
            ("iter", "broadcast"),
            ("broadcast", "left"),
            ("broadcast", "right"),
            ("left", "merge"),
            ("right", "merge"),
        ],
        "{}",
        topology.to_mermaid()
    );
    pipeline.join().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn names_cannot_break_out_of_their_labels() {
    let name = r#"`say "hi" \ #35; <b>x</b> &quot;"#;
    let flow = streamz::iter([1]).named(name).map(|x: &i32| *x);
    let pipeline = flow.pipeline().clone();
    flow.collect().await;
    let topology: Topology = pipeline.topology();
    // Mermaid: every character it would read as markup is an entity code.
    let mermaid = topology.to_mermaid();
    let expected = "#96;say #quot;hi#quot; \\ #35;35; #lt;b#gt;x#lt;/b#gt; #38;quot;<br/>";
    assert!(mermaid.contains(expected), "{mermaid}");
    let label = mermaid.lines().nth(1).unwrap();
    assert_eq!(
        label.matches('"').count(),
        2,
        "only the label's own quotes: {label}"
    );
    for markup in ['`', '<', '>', '&'] {
        assert!(!label.replace("<br/>", "").contains(markup), "{label}");
    }
    // DOT: quotes and backslashes escaped, `&` as an entity.
    let dot = topology.to_dot();
    let expected = r#"label="`say \"hi\" \\ #35; <b>x</b> &amp;quot;\n"#;
    assert!(dot.contains(expected), "{dot}");
}
