//! The shape of a pipeline: its stages, the edges between them and their
//! live counters, rendered as Mermaid or Graphviz DOT.

use std::fmt::Write as _;

use crate::base::counters::StageMetrics;

/// How a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StageKind {
    /// Produces items (`iter`, `stream`, `channel`, a file or Kafka
    /// source); it runs in the task that reads it.
    Source,
    /// A step fused into the task that reads it (`map`, `try_map`,
    /// `filter`, `step`...): no task or queue of its own.
    Fused,
    /// A stage with a task of its own and a bounded channel on its output
    /// (an operator, a [`Stage`](crate::Stage), `async_boundary`, a merge).
    Task,
}

impl StageKind {
    /// `source`, `fused` or `task`.
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Source => "source",
            StageKind::Fused => "fused",
            StageKind::Task => "task",
        }
    }
}

/// One stage of a [`Topology`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopologyStage {
    /// The stage's name, unique in the pipeline.
    pub name: String,
    /// How it runs.
    pub kind: StageKind,
    /// Its counters when the topology was taken.
    pub metrics: StageMetrics,
}

/// An edge of a [`Topology`]: items flow from one stage to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopologyEdge {
    /// The producing stage's index in [`Topology::stages`].
    pub from: usize,
    /// The consuming stage's index in [`Topology::stages`].
    pub to: usize,
    /// The edge's channel when the producer has a task of its own: items
    /// it holds now and its capacity. `None` for a fused edge (the
    /// consumer calls the producer directly; nothing waits in between).
    pub queue: Option<EdgeQueue>,
}

/// What an edge's bounded channel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct EdgeQueue {
    /// Items in the channel now.
    pub held: usize,
    /// The most items it holds ([`EdgeConfig::capacity`](crate::EdgeConfig::capacity)).
    pub capacity: usize,
}

/// The shape of a pipeline with its live counters, from
/// [`Pipeline::topology`](crate::Pipeline::topology): stages in the order
/// they were created (then those of pipelines merged into it) and the
/// edges between them. Render it with [`to_mermaid`](Self::to_mermaid)
/// (GitHub renders Mermaid in Markdown) or [`to_dot`](Self::to_dot)
/// (Graphviz: `dot -Tpng`).
///
/// A stage's final consumer (`collect`, `for_each`, a `Flow` read as a
/// stream) is the application, not a stage, and does not appear.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use streamz::{Map, Stage, StageKind};
///
/// let flow = streamz::iter(1..=4)
///     .filter(|x: &i32| x % 2 == 0)
///     .pipe(Stage::new("double", Map::new(|x: &i32| x * 2)));
/// let pipeline = flow.pipeline().clone();
/// assert_eq!(flow.collect().await.len(), 2);
///
/// let topology = pipeline.topology();
/// let names: Vec<_> = topology.stages.iter().map(|s| s.name.as_str()).collect();
/// assert_eq!(names, ["iter", "filter", "double"]);
/// assert_eq!(topology.stages[2].kind, StageKind::Task);
/// assert_eq!(topology.stages[1].metrics.dropped, 2);
/// let edges: Vec<_> = topology.edges.iter().map(|e| (e.from, e.to)).collect();
/// assert_eq!(edges, [(0, 1), (1, 2)]);
///
/// let mermaid = topology.to_mermaid();
/// assert!(mermaid.starts_with("flowchart LR\n"));
/// assert!(mermaid.contains("s1 -.->|fused| s2"));
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Topology {
    /// The stages, in the order they were created.
    pub stages: Vec<TopologyStage>,
    /// The edges, in the order their consumers were created.
    pub edges: Vec<TopologyEdge>,
}

/// A node's counters in a picture: items in (not for a source) and out,
/// then each other counter that is not zero.
fn counts(stage: &TopologyStage) -> Vec<String> {
    let m = &stage.metrics;
    let mut parts = match stage.kind {
        StageKind::Source => vec![format!("out {}", m.emitted)],
        _ => vec![format!("in {} · out {}", m.received, m.emitted)],
    };
    parts.extend(m.others_not_zero().map(|(label, n)| format!("{label} {n}")));
    parts
}

/// Text safe inside a quoted Mermaid label: what Mermaid would read as
/// markup (`"`, an entity's `#` or `&`, HTML's `<` and `>`, a markdown
/// string's backtick) becomes an entity code, so a name shows as written
/// and cannot end its label.
fn mermaid_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("#quot;"),
            '#' => out.push_str("#35;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '`' => out.push_str("#96;"),
            '&' => out.push_str("#38;"),
            c => out.push(c),
        }
    }
    out
}

/// Text safe inside a quoted DOT string: `\` and `"` escaped for DOT,
/// and `&` written as an entity so Graphviz shows `&quot;` in a name as
/// written instead of as `"`.
fn dot_text(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('&', "&amp;")
}

impl Topology {
    /// The index of the stage named `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// A Mermaid flowchart, left to right: sources as stadiums, fused steps
    /// as rounded boxes, tasks as boxes, each with its counters; a channel
    /// edge is a solid arrow labelled with what it holds of its capacity,
    /// a fused edge a dotted arrow labelled `fused`.
    pub fn to_mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        for (i, stage) in self.stages.iter().enumerate() {
            let label = format!(
                "\"{}<br/>{}\"",
                mermaid_text(&stage.name),
                mermaid_text(&counts(stage).join(" · "))
            );
            let _ = match stage.kind {
                StageKind::Source => writeln!(out, "    s{i}([{label}])"),
                StageKind::Fused => writeln!(out, "    s{i}({label})"),
                StageKind::Task => writeln!(out, "    s{i}[{label}]"),
            };
        }
        for edge in &self.edges {
            let (from, to) = (edge.from, edge.to);
            let _ = match edge.queue {
                Some(q) => writeln!(out, "    s{from} -->|{}/{}| s{to}", q.held, q.capacity),
                None => writeln!(out, "    s{from} -.->|fused| s{to}"),
            };
        }
        out
    }

    /// A Graphviz digraph, left to right, drawn like
    /// [`to_mermaid`](Self::to_mermaid)'s: render it with
    /// `dot -Tpng pipeline.dot -o pipeline.png`.
    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "digraph pipeline {\n    rankdir=LR;\n    node [fontname=\"Helvetica\", fontsize=11];\n    edge [fontname=\"Helvetica\", fontsize=10];\n",
        );
        for (i, stage) in self.stages.iter().enumerate() {
            let shape = match stage.kind {
                StageKind::Source => "shape=box, style=\"rounded,filled\", fillcolor=\"#e8f1fb\"",
                StageKind::Fused => "shape=box, style=\"rounded,dashed\"",
                StageKind::Task => "shape=box, style=filled, fillcolor=\"#f3f3f3\"",
            };
            let _ = writeln!(
                out,
                "    s{i} [label=\"{}\\n{}\", {shape}];",
                dot_text(&stage.name),
                counts(stage)
                    .iter()
                    .map(|part| dot_text(part))
                    .collect::<Vec<_>>()
                    .join("\\n")
            );
        }
        for edge in &self.edges {
            let (from, to) = (edge.from, edge.to);
            let _ = match edge.queue {
                Some(q) => writeln!(
                    out,
                    "    s{from} -> s{to} [label=\"{}/{}\"];",
                    q.held, q.capacity
                ),
                None => writeln!(out, "    s{from} -> s{to} [style=dashed, label=\"fused\"];"),
            };
        }
        out.push_str("}\n");
        out
    }
}
