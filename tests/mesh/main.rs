//! Cross-service tests: real services on a real nats-server, one binary.
mod dead_letters;
mod helpers;
mod tls;
