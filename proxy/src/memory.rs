//! Giving startup memory back. Reading the bootstrap (YAML through the reflection pool) and
//! rendering `/config_dump` need over a megabyte of short-lived heap. glibc keeps freed memory
//! that sits between live allocations resident for good, so after those moments the pool is
//! dropped and glibc is asked to return free pages to the kernel. Start-up also runs much code
//! that serving never does; once the proxy is live, those pages leave its resident set too.
//! And what the heap holds, for `/memory` and the `server.memory_*` gauges ([`usage`]).

use std::time::Duration;

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

/// How long after going live start-up's last steps may still run: signal handlers installed,
/// each listener's first accept. Each of them touches code far from the rest, and each fault
/// maps the 64 KiB around it, so paging out before them left about 1 MB of start-up code
/// resident again.
const START_UP_TAIL: Duration = Duration::from_millis(500);

/// Pages out start-up's code once its last steps are done ([`page_out_startup_code`]), from a
/// task on the current runtime; at once when there is none.
pub fn page_out_startup_code_soon() {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async {
                tokio::time::sleep(START_UP_TAIL).await;
                page_out_startup_code();
            });
        }
        Err(_) => page_out_startup_code(),
    }
}

/// Takes the pages of the proxy's own code and read-only data out of its resident set, once
/// start-up is over: reading config runs code (YAML, descriptors, conversion) that serving never
/// does. The pages stay in the page cache, shared with every proxy started from the same file;
/// what serving needs comes back on first use, as minor faults.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn page_out_startup_code() {
    let (Ok(exe), Ok(maps)) = (
        std::fs::read_link("/proc/self/exe"),
        std::fs::read_to_string("/proc/self/maps"),
    ) else {
        return;
    };
    for line in maps.lines() {
        // `start-end perms offset device inode path`
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms), Some(path)) = (fields.next(), fields.next(), fields.nth(3))
        else {
            continue;
        };
        // Written pages are the process's own: only the file's clean, read-only ones go.
        if perms.contains('w') || std::path::Path::new(path) != exe {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: the range is one of this process's own read-only file mappings, as the kernel
        // lists it; paging it out changes what is resident, not what the memory holds.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn page_out_startup_code() {}

/// Other allocators (musl, jemalloc, macOS) have no such call or return memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// The heap as `/memory` and `server.memory_*` show it, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// In use by the program (Envoy's `allocated`).
    pub allocated: u64,
    /// Taken from the system by the allocator, in use or free (`heap_size`).
    pub heap_size: u64,
    /// Free inside the heap (`pageheap_free`).
    pub free: u64,
    /// The process's anonymous memory resident in RAM (`total_physical_bytes`): the heap's
    /// pages that are really there, with the threads' stacks.
    pub physical: u64,
}

/// The allocator's figures now. glibc's `mallinfo2` sums every arena; tcmalloc, which
/// Envoy's names come from, has no glibc equivalent of its page cache or thread caches.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn usage() -> Usage {
    // SAFETY: mallinfo2 takes no arguments and only reads the allocator's own state.
    let info = unsafe { libc::mallinfo2() };
    let mapped = info.hblkhd as u64;
    Usage {
        allocated: info.uordblks as u64 + mapped,
        heap_size: info.arena as u64 + mapped,
        free: info.fordblks as u64,
        physical: resident_anonymous().unwrap_or(0),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn usage() -> Usage {
    Usage {
        physical: resident_anonymous().unwrap_or(0),
        ..Usage::default()
    }
}

/// `RssAnon` from `/proc/self/status`, in bytes.
fn resident_anonymous() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
