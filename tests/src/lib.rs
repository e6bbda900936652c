//! Support code for integration tests against the real control plane.
