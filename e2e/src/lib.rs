//! Test infrastructure for moe-serve's end-to-end tests on a real Kubernetes control plane.
