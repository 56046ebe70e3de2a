//! glibc's allocator, tuned once for the executor (process-wide, when the backend starts).
//!
//! The executor allocates every intermediate tensor fresh and frees it as soon as its last
//! reader ran: megabytes per operator, on the model's pool threads. With glibc's defaults
//! those threads' arenas hand freed memory back to the kernel and fault it in again on the
//! next request (BERT-base shape, batch 8: ~43 000 page faults and ~15 % of the time per
//! inference). Keeping blocks of up to 32 MiB in the heap and trimming only above 256 MiB
//! removes that, at the price of the process keeping what it used at its peak (as
//! onnxruntime's arena does). A pool thread's arena is made of 64 MiB heaps, and glibc
//! unmaps a heap as soon as it is empty whatever the trim threshold, so tensors of tens of
//! MiB (ResNet-50 at batch 8) still came back as fresh pages each request (~19 000 faults
//! per inference); a 64 MiB top pad keeps those heaps. A `MALLOC_*` variable in the environment (the user's own
//! tuning) or `KILN_MALLOC_TUNING=0` leaves glibc as it is.

/// Largest block served from the heap instead of its own mapping (glibc's maximum).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of a heap kept before it is returned to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 256 << 20;
/// Extra memory a heap grows by and keeps when trimmed; at a thread heap's full size (64
/// MiB) an empty heap is kept rather than unmapped.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: i32 = 64 << 20;

/// Applies the tuning once per process (no-op on other platforms); returns whether it did.
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DONE.get_or_init(|| {
            let user_set =
                std::env::vars_os().any(|(k, _)| k.to_string_lossy().starts_with("MALLOC_"));
            let off = std::env::var("KILN_MALLOC_TUNING").is_ok_and(|v| v == "0");
            if user_set || off {
                return false;
            }
            // SAFETY: mallopt only changes allocator parameters; glibc serialises it.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                    && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
            }
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Blocks of at least this many bytes start on a cache line.
const ALIGN_FROM: usize = 256;
/// A cache line: what AVX-512 loads need to not straddle two.
const LINE: usize = 64;

/// The backend's Rust heap: the system allocator, with every block of [`ALIGN_FROM`] bytes
/// or more starting on a 64-byte line. Tensors, packed weights and scratch matrices are
/// read in whole 64-byte vectors by the AVX-512 kernels; glibc aligns to 16 bytes, so
/// three in four of those loads straddled two lines (about 13 % of a matrix product's
/// speed on the machine it was measured on). Blocks are still released with `free`, so
/// memory crossing to the server's allocator stays valid.
pub struct LineAligned;

impl LineAligned {
    fn widen(layout: std::alloc::Layout) -> std::alloc::Layout {
        if layout.size() >= ALIGN_FROM && layout.align() < LINE {
            // A power of two no larger than isize::MAX, with a size already valid for a
            // smaller alignment rounded up to at most LINE more: cannot fail in practice;
            // the original layout serves if it did.
            std::alloc::Layout::from_size_align(layout.size(), LINE).unwrap_or(layout)
        } else {
            layout
        }
    }
}

// SAFETY: every call forwards to `System` with the layout widened by one fixed rule of
// the size, so a block is freed (or resized) with the layout it was allocated with.
unsafe impl std::alloc::GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        unsafe { std::alloc::System.alloc(Self::widen(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        unsafe { std::alloc::System.alloc_zeroed(Self::widen(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, Self::widen(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        let old = Self::widen(layout);
        match std::alloc::Layout::from_size_align(size, layout.align()) {
            Ok(new) if Self::widen(new).align() == old.align() => unsafe {
                std::alloc::System.realloc(ptr, old, size)
            },
            Ok(new) => unsafe {
                // The block crosses ALIGN_FROM: a fresh block with the new alignment.
                let fresh = self.alloc(new);
                if !fresh.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(size));
                    self.dealloc(ptr, layout);
                }
                fresh
            },
            Err(_) => std::ptr::null_mut(),
        }
    }
}

#[global_allocator]
static HEAP: LineAligned = LineAligned;
