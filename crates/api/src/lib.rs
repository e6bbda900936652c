//! Types shared by every crac-operator component: the `CracApp` resource, the label and
//! annotation keys, and the contract between the operator and the in-pod agent.

pub mod agent;
pub mod conditions;
pub mod control;
pub mod cracapp;
pub mod duration;
pub mod labels;
pub mod policy;
pub mod serving;

pub use cracapp::{CracApp, CracAppSpec, CracAppStatus};
pub use policy::{CracScalePolicy, CracScalePolicySpec};
