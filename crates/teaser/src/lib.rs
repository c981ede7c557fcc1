//! Fixture-driven integration tests for rusty-genius (in progress).
