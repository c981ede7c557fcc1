//! Errors reach an in-process caller of the handle with their cause: the
//! `GeniusError` itself, whose kind and source a program can match on.

use facecrab::testing::TempDir;
use facecrab::{AssetAuthority, FacecrabError};
use futures::StreamExt;
use rusty_genius_core::{ErrorKind, GeniusError, InferenceConfig};
use rusty_genius_cortex::Pinky;
use rusty_genius_stem::Orchestrator;

/// An Orchestrator on Pinky whose facecrab knows no model and may not use
/// the network.
fn offline(dir: &TempDir, pinky: Pinky) -> Orchestrator {
    let authority = AssetAuthority::builder()
        .cache_dir(dir.join("hub"))
        .registry_file(dir.join("no-registry.json"))
        .offline(true)
        .token(None)
        .build()
        .unwrap();
    Orchestrator::builder()
        .pinky(pinky)
        .asset_authority(authority)
        .build()
        .unwrap()
}

/// The facecrab error behind a report, if it is there.
fn facecrab_cause(error: Option<&GeniusError>) -> Option<&FacecrabError> {
    match error? {
        GeniusError::ModelNotFound {
            source: Some(source),
            ..
        } => source.downcast_ref::<FacecrabError>(),
        _ => None,
    }
}

#[async_std::test]
async fn a_failed_load_keeps_its_cause_for_the_caller_and_for_the_requests_that_waited() {
    let dir = TempDir::new("stem-errors");
    let pinky = Pinky::new()
        .with_script(vec!["tick "; 10_000])
        .with_token_delay(std::time::Duration::from_millis(1));
    let genius = offline(&dir, pinky).start();
    let model = dir.join("pinky.gguf");
    std::fs::write(&model, b"GGUF pinky").unwrap();
    genius.load(&model.display().to_string()).await.unwrap();
    // A load of another model does not wait for the running request (it
    // may fail before the next line runs); a request for that model, sent
    // after the load, fails with the same cause.
    let mut running = genius.infer("hello", InferenceConfig::default());
    assert!(running.next().await.unwrap().is_ok());
    let load = genius.load("no-such-model");
    futures::pin_mut!(load);
    let early = futures::poll!(&mut load);
    let mut waiting = genius.infer(
        "hello",
        InferenceConfig::default().with_model("no-such-model"),
    );
    drop(running);

    let err = match early {
        std::task::Poll::Ready(answer) => answer,
        std::task::Poll::Pending => load.await,
    }
    .unwrap_err();
    assert_eq!(err.kind, ErrorKind::ModelNotFound);
    match err.error() {
        Some(GeniusError::ModelNotFound { name, .. }) => assert_eq!(name, "no-such-model"),
        other => panic!("not a ModelNotFound: {other:?}"),
    }
    assert!(
        matches!(
            facecrab_cause(err.error()),
            Some(FacecrabError::NotFound { .. })
        ),
        "{:?}",
        err.error()
    );
    // The cause is also the report's std::error::Error source.
    let source = std::error::Error::source(&err).expect("a source");
    assert!(source.downcast_ref::<GeniusError>().is_some());

    let failed = waiting
        .next()
        .await
        .expect("an answer")
        .expect_err("the model was not found");
    assert_eq!(failed.kind, ErrorKind::ModelNotFound, "{failed}");
    assert!(matches!(
        facecrab_cause(failed.error()),
        Some(FacecrabError::NotFound { .. })
    ));

    // A bad request's error is typed too.
    genius.load(&model.display().to_string()).await.unwrap();
    let bad = InferenceConfig {
        top_p: 0.0,
        ..InferenceConfig::default()
    };
    let mut refused = genius.infer("hello", bad);
    let err = refused.next().await.unwrap().unwrap_err();
    assert!(
        matches!(
            err.error(),
            Some(GeniusError::InvalidConfig { field: "top_p", .. })
        ),
        "{err:?}"
    );
}
