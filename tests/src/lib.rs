//! Cross-service tests live in `tests/mesh/`.
