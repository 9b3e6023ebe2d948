//! The config gate, case by case: each area's fields as `remora-proxy --mode validate` and an
//! xDS NACK report them (the full field path and why), and the model values accepted configs
//! become. Every case is one patch to one small bootstrap (see `support`), read in-process.

mod access_log;
mod bootstrap;
mod cluster;
mod hcm;
mod listener;
mod resource;
mod route;
mod support;
mod tls;
