//! System shared memory (Triton's `system_shared_memory` extension): POSIX shared-memory
//! objects a client created (`shm_open`) and registered under a region name; inputs are
//! read from and outputs written to them, named by the tensor parameters
//! `shared_memory_region`, `shared_memory_offset` and `shared_memory_byte_size`.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::error::{CoreError, CoreResult, ErrorKind};

/// One registered region: `byte_size` bytes at `offset` of the object `key`, mapped.
struct Region {
    key: String,
    offset: u64,
    byte_size: u64,
    map: memmap2::MmapRaw,
}

/// The registered system shared-memory regions, by name.
#[derive(Default)]
pub struct SharedMemory {
    regions: Mutex<BTreeMap<String, Arc<Region>>>,
}

/// A registered region as the status APIs report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionStatus {
    /// Region name.
    pub name: String,
    /// The shared-memory object's key (`shm_open` name).
    pub key: String,
    /// Offset of the region in the object.
    pub offset: u64,
    /// Size of the region.
    pub byte_size: u64,
}

impl RegionStatus {
    /// `{name, key, offset, byte_size}`, as Triton's HTTP status lists it.
    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size})
    }
}

/// Where an output is to be written: a range of a registered region (kept mapped until
/// the request is done, even if the region is unregistered meanwhile).
#[derive(Clone)]
pub struct ShmSlot {
    region_name: String,
    region: Arc<Region>,
    offset: usize,
    byte_size: usize,
}

impl std::fmt::Debug for ShmSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ShmSlot({} @ {} + {})",
            self.region_name, self.offset, self.byte_size
        )
    }
}

impl PartialEq for ShmSlot {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.region, &other.region)
            && (self.offset, self.byte_size) == (other.offset, other.byte_size)
    }
}

impl Eq for ShmSlot {}

impl ShmSlot {
    /// Copies an output's bytes into the slot; an error when they do not fit.
    pub fn write(&self, output: &str, data: &[u8]) -> CoreResult<()> {
        if data.len() > self.byte_size {
            return Err(CoreError::internal(format!(
                "shared memory size specified with the request for output '{output}' ({} bytes) should be at least {} bytes to hold the results",
                self.byte_size,
                data.len()
            )));
        }
        // SAFETY: offset + byte_size lies inside the mapping (checked when the slot was
        // made) and the mapping lives as long as `self.region`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.region.map.as_mut_ptr().add(self.offset),
                data.len(),
            )
        };
        Ok(())
    }
}

/// What the shared-memory parameters of one tensor say.
struct TensorShm<'p> {
    region: &'p str,
    offset: u64,
    byte_size: u64,
}

impl SharedMemory {
    /// Maps `byte_size` bytes at `offset` of the shared-memory object `key` as region
    /// `name` (Triton's errors: a taken name, an object that cannot be opened, a range
    /// outside the object).
    pub fn register(&self, name: &str, key: &str, offset: u64, byte_size: u64) -> CoreResult<()> {
        let mut regions = self.lock();
        if regions.contains_key(name) {
            return Err(CoreError::new(
                ErrorKind::AlreadyExists,
                format!("shared memory region '{name}' already in manager"),
            ));
        }
        let file = open_object(key)?;
        let size = file
            .metadata()
            .map_err(|_| CoreError::internal(format!("Invalid shared memory region: '{key}'")))?
            .len();
        let invalid = || {
            CoreError::invalid(format!(
                "failed to register shared memory region '{name}': invalid args"
            ))
        };
        let end = offset.checked_add(byte_size).ok_or_else(invalid)?;
        if end > size {
            return Err(invalid());
        }
        let len = usize::try_from(byte_size).map_err(|_| invalid())?;
        let map = memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(&file)
            .map_err(|e| {
                CoreError::invalid(format!(
                    "failed to register shared memory region '{name}': {e}"
                ))
            })?;
        regions.insert(
            name.to_string(),
            Arc::new(Region {
                key: key.to_string(),
                offset,
                byte_size,
                map,
            }),
        );
        tracing::info!(
            region = name,
            key,
            offset,
            byte_size,
            "registered system shared memory"
        );
        Ok(())
    }

    /// Unregisters one region (a name not registered is not an error, as in Triton) or,
    /// with `None`, every region. Requests in flight keep their mappings until they end.
    pub fn unregister(&self, name: Option<&str>) {
        let mut regions = self.lock();
        match name {
            Some(n) => {
                regions.remove(n);
            }
            None => regions.clear(),
        }
    }

    /// Status of one region (an error when it is not registered) or of all.
    pub fn status(&self, name: Option<&str>) -> CoreResult<Vec<RegionStatus>> {
        let regions = self.lock();
        let entry = |n: &str, r: &Region| RegionStatus {
            name: n.to_string(),
            key: r.key.clone(),
            offset: r.offset,
            byte_size: r.byte_size,
        };
        match name {
            None => Ok(regions.iter().map(|(n, r)| entry(n, r)).collect()),
            Some(n) => regions.get(n).map(|r| vec![entry(n, r)]).ok_or_else(|| {
                CoreError::not_found(format!("Unable to find system shared memory region: '{n}'"))
            }),
        }
    }

    /// An input's bytes when its parameters name a region (copied out of it), `None`
    /// when they do not.
    pub fn input(&self, tensor: &str, params: &Map<String, Value>) -> CoreResult<Option<Bytes>> {
        let Some(p) = tensor_params(tensor, params)? else {
            return Ok(None);
        };
        let (region, at, len) = self.resolve(&p)?;
        // SAFETY: `resolve` checked that at + len lies inside the mapping, which `region`
        // keeps alive for this copy.
        let bytes = unsafe { std::slice::from_raw_parts(region.map.as_ptr().add(at), len) };
        Ok(Some(Bytes::copy_from_slice(bytes)))
    }

    /// Where a requested output goes when its parameters name a region.
    pub fn output(&self, tensor: &str, params: &Map<String, Value>) -> CoreResult<Option<ShmSlot>> {
        let Some(p) = tensor_params(tensor, params)? else {
            return Ok(None);
        };
        if params.contains_key("classification") {
            return Err(CoreError::invalid(
                "output can't set both 'shared_memory_region' and 'classification'",
            ));
        }
        let (region, offset, byte_size) = self.resolve(&p)?;
        Ok(Some(ShmSlot {
            region_name: p.region.to_string(),
            region,
            offset,
            byte_size,
        }))
    }

    /// The region a tensor names and its byte range in it, checked as Triton checks it.
    fn resolve(&self, p: &TensorShm<'_>) -> CoreResult<(Arc<Region>, usize, usize)> {
        let name = p.region;
        let region = self.lock().get(name).cloned().ok_or_else(|| {
            CoreError::not_found(format!("Unable to find shared memory region: '{name}'"))
        })?;
        if p.offset >= region.byte_size {
            return Err(CoreError::invalid(format!(
                "Invalid offset for shared memory region: '{name}'"
            )));
        }
        if p.offset.saturating_add(p.byte_size) > region.byte_size {
            return Err(CoreError::invalid(format!(
                "Invalid offset + byte size for shared memory region: '{name}'"
            )));
        }
        // Both fit in the mapping, whose length is a usize.
        Ok((region, p.offset as usize, p.byte_size as usize))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Region>>> {
        self.regions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads a tensor's shared-memory parameters: none, or a region with a byte size (and an
/// optional offset); anything else is the error Triton gives.
fn tensor_params<'p>(
    tensor: &str,
    params: &'p Map<String, Value>,
) -> CoreResult<Option<TensorShm<'p>>> {
    let region = match params.get("shared_memory_region") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            return Err(CoreError::invalid(format!(
                "invalid value type for 'shared_memory_region' parameter for tensor '{tensor}', expected string"
            )))
        }
    };
    let number = |key: &str| -> CoreResult<Option<u64>> {
        match params.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                CoreError::invalid(format!(
                    "invalid value type for '{key}' parameter for tensor '{tensor}', expected a non-negative integer"
                ))
            }),
        }
    };
    let (offset, byte_size) = (
        number("shared_memory_offset")?,
        number("shared_memory_byte_size")?,
    );
    let Some(region) = region else {
        for (key, v) in [
            ("shared_memory_offset", offset),
            ("shared_memory_byte_size", byte_size),
        ] {
            if v.is_some() {
                return Err(CoreError::invalid(format!(
                    "'{key}' can not be specified without 'shared_memory_region' parameter for tensor '{tensor}'"
                )));
            }
        }
        return Ok(None);
    };
    let byte_size = byte_size.ok_or_else(|| {
        CoreError::invalid(format!(
            "'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter for tensor '{tensor}'"
        ))
    })?;
    Ok(Some(TensorShm {
        region,
        offset: offset.unwrap_or(0),
        byte_size,
    }))
}

/// Opens the POSIX shared-memory object `key` (as `shm_open` names it) read-write.
fn open_object(key: &str) -> CoreResult<std::fs::File> {
    use std::os::fd::FromRawFd;
    let unable = || CoreError::internal(format!("Unable to open shared memory region: '{key}'"));
    let c_key = std::ffi::CString::new(key).map_err(|_| unable())?;
    // SAFETY: c_key is a valid C string; the returned descriptor is owned by the File.
    let fd = unsafe { libc::shm_open(c_key.as_ptr(), libc::O_RDWR, 0) };
    if fd < 0 {
        return Err(unable());
    }
    // SAFETY: fd is a freshly opened descriptor nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared-memory object of `len` bytes (0, 1, 2, ...), unlinked when dropped.
    struct Object(String);

    impl Object {
        fn new(tag: &str, len: usize) -> Object {
            let key = format!("/kiln_test_{tag}_{}", std::process::id());
            let c = std::ffi::CString::new(key.clone()).unwrap();
            // SAFETY: plain libc calls on a valid name; the descriptor is closed below.
            unsafe {
                let fd = libc::shm_open(c.as_ptr(), libc::O_CREAT | libc::O_RDWR, 0o600);
                assert!(fd >= 0, "shm_open");
                assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
                let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
                assert_eq!(libc::write(fd, data.as_ptr().cast(), len), len as isize);
                libc::close(fd);
            }
            Object(key)
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let c = std::ffi::CString::new(self.0.clone()).unwrap();
            // SAFETY: unlinking a name this test created.
            unsafe { libc::shm_unlink(c.as_ptr()) };
        }
    }

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn registered_regions_are_read_written_and_listed() {
        let obj = Object::new("rw", 64);
        let shm = SharedMemory::default();
        shm.register("r", &obj.0, 16, 32).unwrap();
        let e = shm.register("r", &obj.0, 0, 8).unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists);
        // Bytes 4..8 of the region are bytes 20..24 of the object.
        let p = params(
            json!({"shared_memory_region": "r", "shared_memory_offset": 4,
                               "shared_memory_byte_size": 4}),
        );
        assert_eq!(&shm.input("x", &p).unwrap().unwrap()[..], &[20, 21, 22, 23]);
        let slot = shm.output("y", &p).unwrap().unwrap();
        slot.write("y", &[9, 9]).unwrap();
        assert_eq!(&shm.input("x", &p).unwrap().unwrap()[..], &[9, 9, 22, 23]);
        let e = slot.write("y", &[0; 5]).unwrap_err();
        assert!(
            e.message.contains("should be at least 5 bytes"),
            "{}",
            e.message
        );
        let st = shm.status(None).unwrap();
        assert_eq!(
            st[0].to_json(),
            json!({"name": "r", "key": obj.0, "offset": 16, "byte_size": 32})
        );
        assert_eq!(
            shm.status(Some("nope")).unwrap_err().kind,
            ErrorKind::NotFound
        );
        shm.unregister(Some("r"));
        assert!(shm.status(None).unwrap().is_empty());
        // The slot still holds its mapping.
        slot.write("y", &[1]).unwrap();
    }

    #[test]
    fn bad_registrations_and_tensor_parameters_are_errors() {
        let obj = Object::new("bad", 16);
        let shm = SharedMemory::default();
        let e = shm.register("r", "/kiln_no_such_object", 0, 4).unwrap_err();
        assert!(e.message.contains("Unable to open"), "{}", e.message);
        let e = shm.register("r", &obj.0, 8, 9).unwrap_err();
        assert!(e.message.contains("invalid args"), "{}", e.message);
        shm.register("r", &obj.0, 0, 16).unwrap();
        let cases = [
            (
                json!({"shared_memory_region": "x", "shared_memory_byte_size": 4}),
                "Unable to find",
            ),
            (json!({"shared_memory_region": "r"}), "must be specified"),
            (
                json!({"shared_memory_byte_size": 4}),
                "without 'shared_memory_region'",
            ),
            (
                json!({"shared_memory_region": 3, "shared_memory_byte_size": 4}),
                "expected string",
            ),
            (
                json!({"shared_memory_region": "r", "shared_memory_offset": 16,
                    "shared_memory_byte_size": 1}),
                "Invalid offset for",
            ),
            (
                json!({"shared_memory_region": "r", "shared_memory_offset": 8,
                    "shared_memory_byte_size": 9}),
                "Invalid offset + byte size",
            ),
        ];
        for (p, want) in cases {
            let e = shm.input("t", &params(p.clone())).unwrap_err();
            assert!(e.message.contains(want), "{p}: {}", e.message);
        }
        let p = params(
            json!({"shared_memory_region": "r", "shared_memory_byte_size": 4,
                               "classification": 2}),
        );
        assert!(shm
            .output("t", &p)
            .unwrap_err()
            .message
            .contains("classification"));
        assert_eq!(shm.input("t", &Map::new()).unwrap(), None);
    }
}
