//! Public types are `Send`/`Sync` where users need them to be.

use streamz::*;

fn send<T: Send>() {}
fn sync<T: Sync>() {}
fn send_sync<T: Send + Sync>() {}

#[allow(dead_code)]
struct NotSync(std::cell::Cell<u8>);

#[test]
fn public_types_are_send_and_sync() {
    send_sync::<StreamError>();
    send_sync::<Pipeline>();
    send_sync::<Pusher<u8>>();
    send_sync::<EdgeConfig>();
    send_sync::<StageMetrics>();
    send_sync::<PipelineError>();
    send_sync::<ConfigError>();
    send::<Flow<u8>>();
    send::<Chunk<u8>>();
    // Items need only be Send: a Flow of a !Sync item is still Send, and an
    // error carrying such an item is still Send + Sync.
    send::<Flow<NotSync>>();
    let err = StreamError::failed("s", "e").with_item(NotSync(Default::default()));
    fn check<T: Send + Sync>(_: &T) {}
    check(&err);
    sync::<Stage<Map<fn(&u8) -> u8>>>();
}

#[test]
fn futures_of_sinks_are_send() {
    fn is_send<F: std::future::Future + Send>(_: F) {}
    let flow = iter(0..3u8);
    is_send(flow.collect());
    let (tx, _flow) = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _g = rt.enter();
        channel::<u8>()
    };
    is_send(async move { tx.send(1).await });
}
