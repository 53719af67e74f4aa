//! Giving memory back to the system once a burst is over.
//!
//! A burst of connections (a flash sale's thousand buyers) makes the allocator grow its heaps
//! by tens of megabytes: each connection has its buffers and its task. When the burst ends the
//! memory is free but glibc's malloc keeps it mapped, in every thread's arena, for reuse, so
//! the process would stay at its peak size for good. `malloc_trim` returns the free pages of
//! every arena to the kernel; it walks the heaps under their locks, so it runs only when the
//! server is idle after a busy spell (`http`'s trimmer), never on the request path.
//!
//! The alternative, `M_ARENA_MAX` and a low `M_TRIM_THRESHOLD` set at start, trims on every
//! `free` that leaves enough at the top of a heap, on the request path, and still leaves the
//! holes in the middle of a heap that only `malloc_trim` gives back.

/// Returns the allocator's free memory to the system (glibc); a no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            /// glibc's `int malloc_trim(size_t pad)`: releases free memory at the top of the
            /// main heap and whole free pages anywhere in every arena (since glibc 2.8).
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointer and is thread-safe (it locks each arena).
        unsafe {
            malloc_trim(0);
        }
    }
}
