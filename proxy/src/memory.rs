//! Giving startup memory back. Reading the bootstrap (YAML through the reflection pool) and
//! rendering `/config_dump` need over a megabyte of short-lived heap. glibc keeps freed memory
//! that sits between live allocations resident for good, so after those moments the pool is
//! dropped and glibc is asked to return free pages to the kernel.

/// Drops the cached reflection pool and returns free heap pages to the kernel. Call it at a
/// quiet moment: glibc locks each arena in turn while it trims.
pub fn release_config_memory() {
    xds_api::release_descriptor_pool();
    trim_heap();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers and has no precondition; 0 means keep no padding.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators (musl, jemalloc, macOS) have no such call or return memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}
