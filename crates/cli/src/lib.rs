//! kubectl-crac: the pure parts (tables, ages, sizes, the explanation of an app that is not
//! Ready), tested without a cluster. `main.rs` fetches and patches; this formats.

pub mod format;
