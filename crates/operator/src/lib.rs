//! The crac-operator library: pure builders and the reconciler. The binary is thin.

pub mod crds;
