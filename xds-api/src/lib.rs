//! Envoy xDS v3 wire API: generated types, type URLs, Any registry and the proto3 JSON/YAML mapping.
