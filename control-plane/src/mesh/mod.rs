//! The mesh: from services, endpoints, pods and traffic policies (Kubernetes, or the REST
//! API) to the Envoy resources each sidecar needs, generated rather than written by hand.
//!
//! ```text
//! kube (watchers + reflectors) ─┐
//!                               ├─► hub: queue ─► generator ─► per-sidecar snapshots ─► xDS streams
//! REST objects (in the store) ──┘        (model)    (translate)    (+ the group's raw resources)
//! ```
//!
//! - [`model`]: the inputs, whatever their source;
//! - [`policy`]: the `TrafficPolicy` object, its checks and the merge into an effective policy;
//! - [`translate`]: pure functions from model to Envoy resources;
//! - [`generate`]: what is derived, kept up to date incrementally;
//! - [`hub`]: per-sidecar snapshots and policy status;
//! - [`sidecar`]: which sidecar a connecting node is; [`identity`]: its SPIFFE identity and
//!   the SDS secrets (workload certificate, trust bundle) that prove it;
//! - [`kubernetes`]: the Kubernetes source; [`rest`]: the REST API for mesh objects;
//!   [`stored`]: those objects as stored, and the updates they stand for; [`trust_bundle`]:
//!   the trust bundle ConfigMap in injected namespaces;
//! - [`names`]: names of generated resources.

pub mod generate;
pub mod hub;
pub mod identity;
pub mod kubernetes;
pub mod model;
pub mod names;
pub mod policy;
pub mod rest;
pub mod sidecar;
pub mod stored;
pub mod translate;
pub mod trust_bundle;
