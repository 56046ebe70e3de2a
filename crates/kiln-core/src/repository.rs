//! The model repository: Triton's layout on disk, model states, load and unload.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use kiln_proto::inference::{model_version_policy::PolicyChoice, ModelConfig};

use crate::config;
use crate::ensemble;
use crate::error::{CoreError, CoreResult, ErrorKind};
use crate::loader;
use crate::model::{gpu_count, ModelShared, ModelVersion};

/// How models get loaded (tritonserver's `--model-control-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMode {
    /// Load everything at start; load/unload API refused.
    None,
    /// Load only `--load-model` models at start; load/unload API allowed.
    Explicit,
    /// Load everything at start, then follow the repository's changes every
    /// `poll_secs`; load/unload API refused.
    Poll,
}

/// Where models and backends are.
#[derive(Debug, Clone)]
pub struct RepositoryOptions {
    /// `--model-repository` (repeatable: a model name is looked up in each, in order).
    pub repositories: Vec<PathBuf>,
    /// `--backend-directory`.
    pub backend_directory: PathBuf,
    /// `--model-control-mode`.
    pub control_mode: ControlMode,
    /// `--load-model` names (`*` = all), used in explicit mode.
    pub startup_models: Vec<String>,
    /// `--cache-config local,size=N`: the response cache models may enable.
    pub response_cache: Option<Arc<crate::cache::ResponseCache>>,
    /// Backends complete partial configs from the model files (off with
    /// `--disable-auto-complete-config` or `--strict-model-config=true`).
    pub autocomplete: bool,
    /// `--repository-poll-secs`: how often poll mode looks at the repositories.
    pub poll_secs: u64,
    /// `--rate-limit=execution_count`: the limiter every model instance runs under.
    pub rate_limiter: Option<Arc<crate::rate_limit::RateLimiter>>,
    /// `--model-load-thread-count`: how many models load at the same time (at least 1).
    pub load_threads: usize,
    /// `--model-config-name`: each model's `configs/<name>.pbtxt` is its config where it
    /// has one (else its `config.pbtxt`).
    pub config_name: Option<String>,
}

impl RepositoryOptions {
    /// The config file of the model in `model_dir`: `configs/<--model-config-name>.pbtxt`
    /// when that exists, else `config.pbtxt` (which may not exist either).
    pub fn config_file(&self, model_dir: &Path) -> PathBuf {
        self.config_name
            .as_ref()
            .map(|n| model_dir.join("configs").join(format!("{n}.pbtxt")))
            .filter(|f| f.is_file())
            .unwrap_or_else(|| model_dir.join("config.pbtxt"))
    }

    /// The folder of model `name`: in the first repository that has it (else where it
    /// would be in the first, for messages).
    pub fn model_dir(&self, name: &str) -> PathBuf {
        self.repositories
            .iter()
            .map(|r| r.join(name))
            .find(|d| d.is_dir())
            .unwrap_or_else(|| {
                self.repositories
                    .first()
                    .map_or_else(|| PathBuf::from(name), |r| r.join(name))
            })
    }
}

/// State of one model version.
#[derive(Clone)]
pub enum VersionState {
    /// Being loaded.
    Loading,
    /// Serving.
    Ready(Arc<ModelVersion>),
    /// Not serving, with the reason.
    Unavailable(String),
}

impl VersionState {
    /// Triton's state name.
    pub fn name(&self) -> &'static str {
        match self {
            VersionState::Loading => "LOADING",
            VersionState::Ready(_) => "READY",
            VersionState::Unavailable(_) => "UNAVAILABLE",
        }
    }
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Model name.
    pub name: String,
    /// Version, when the model has been loaded (or tried to).
    pub version: Option<i64>,
    /// State name, when known.
    pub state: Option<&'static str>,
    /// Why it is not ready.
    pub reason: String,
}

/// Every model's versions and their states, shared with the ensembles (whose steps look
/// up the composing models' current versions).
pub(crate) type ModelTable = RwLock<BTreeMap<String, BTreeMap<i64, VersionState>>>;
pub(crate) type Models = Arc<ModelTable>;

/// Owns every model's versions and their states.
pub struct ModelManager {
    opts: RepositoryOptions,
    models: Models,
    /// One lock per model name: a model's loads and unloads take turns; different
    /// models load at the same time.
    locks: Mutex<BTreeMap<String, Arc<Mutex<()>>>>,
    /// Poll mode: what each model's folder looked like when it was last loaded.
    seen: Mutex<BTreeMap<String, u64>>,
    /// Models loaded from files sent with the load request, and where those files are.
    overrides: Mutex<BTreeMap<String, PathBuf>>,
}

/// The ready version `version` of `name` (the newest ready one for `None`), with Triton's
/// errors: 404 for a model or version it does not know, 503 for one not ready.
pub(crate) fn find(
    models: &Models,
    name: &str,
    version: Option<i64>,
) -> CoreResult<Arc<ModelVersion>> {
    let models = models.read().unwrap_or_else(|p| p.into_inner());
    let Some(slot) = models.get(name) else {
        return Err(CoreError::not_found(format!(
            "Request for unknown model: '{name}' is not found"
        )));
    };
    match version {
        Some(v) => match slot.get(&v) {
            Some(VersionState::Ready(mv)) => Ok(mv.clone()),
            Some(_) => Err(CoreError::unavailable(format!(
                "Request for unknown model: '{name}' version {v} is not at ready state"
            ))),
            None => Err(CoreError::not_found(format!(
                "Request for unknown model: '{name}' version {v} is not found"
            ))),
        },
        None => slot
            .values()
            .rev()
            .find_map(|s| match s {
                VersionState::Ready(mv) => Some(mv.clone()),
                _ => None,
            })
            .ok_or_else(|| {
                CoreError::new(
                    ErrorKind::Unavailable,
                    format!("Request for unknown model: '{name}' has no available versions"),
                )
            }),
    }
}

fn read_config(
    file: &Path,
    model_dir: &Path,
    name: &str,
    override_json: Option<&str>,
) -> CoreResult<ModelConfig> {
    let (mut cfg, text) = match override_json {
        Some(j) => (
            config::parse_json(j).map_err(|e| CoreError::invalid(e.to_string()))?,
            String::new(),
        ),
        None if !file.exists() => (detect_config(model_dir, name)?, String::new()),
        None => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                CoreError::invalid(format!("cannot read '{}': {e}", file.display()))
            })?;
            (
                config::parse_pbtxt(file, &text).map_err(|e| CoreError::invalid(e.to_string()))?,
                text,
            )
        }
    };
    config::normalize(&mut cfg, file, &text, name, gpu_count())
        .map_err(|e| CoreError::invalid(e.to_string()))?;
    Ok(cfg)
}

/// Model files Triton recognises without a config.pbtxt (files, not folders of that name),
/// and the platform/backend they imply.
const DEFAULT_MODEL_FILES: &[(&str, &str, &str)] =
    &[("model.onnx", "onnxruntime_onnx", "onnxruntime")];

/// A minimal config (name, platform, backend) for a folder without config.pbtxt, from the
/// model file in its version folders, as Triton does; the backend's auto-complete fills in
/// the rest.
fn detect_config(model_dir: &Path, name: &str) -> CoreResult<ModelConfig> {
    for v in available_versions(model_dir) {
        for (file, platform, backend) in DEFAULT_MODEL_FILES {
            if model_dir.join(v.to_string()).join(file).is_file() {
                return Ok(ModelConfig {
                    name: name.to_string(),
                    platform: platform.to_string(),
                    backend: backend.to_string(),
                    ..Default::default()
                });
            }
        }
    }
    Err(CoreError::invalid(format!(
        "'{}' has no config.pbtxt and no model file to derive one from ({})",
        model_dir.join("config.pbtxt").display(),
        DEFAULT_MODEL_FILES
            .iter()
            .map(|f| format!("<version>/{}", f.0))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Where the files of load requests are written (removed at shutdown).
fn sent_files_root() -> PathBuf {
    std::env::temp_dir().join(format!("kiln-models-{}", std::process::id()))
}

/// A digest of every file under `dir`: relative name, size and modification time.
fn fingerprint(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(PathBuf, u64, Option<std::time::SystemTime>)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let rel = path.strip_prefix(base).unwrap_or(&path).to_path_buf();
            if meta.is_dir() {
                out.push((rel, 0, None));
                walk(&path, base, out);
            } else {
                out.push((rel, meta.len(), meta.modified().ok()));
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files);
    files.sort();
    let mut h = std::hash::DefaultHasher::new();
    files.hash(&mut h);
    h.finish()
}

/// Lets the backend complete `cfg` (Triton's auto-complete) from the files of `version`.
fn autocomplete(
    cfg: ModelConfig,
    lib: &loader::BackendLibrary,
    dir: &Path,
    version: i64,
) -> CoreResult<ModelConfig> {
    let Some(f) = lib.autocomplete_fn() else {
        return Ok(cfg);
    };
    let json = config::to_json(&cfg).to_string();
    let path = dir.display().to_string();
    let info = kiln_abi::KilnModelInfo {
        name: kiln_abi::KilnStr::from_str(&cfg.name),
        version,
        repository_path: kiln_abi::KilnStr::from_str(&path),
        config_json: kiln_abi::KilnStr::from_str(&json),
    };
    unsafe extern "C" fn set(ctx: *mut std::ffi::c_void, s: kiln_abi::KilnStr) {
        // SAFETY: `ctx` is the `Option<String>` below; `s` is valid for the call.
        let out = unsafe { &mut *(ctx as *mut Option<String>) };
        *out = Some(String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned());
    }
    let mut completed: Option<String> = None;
    // SAFETY: ABI call; `info` and its strings outlive it, `set` copies the string.
    let e = unsafe {
        f(
            lib.state,
            &info,
            &mut completed as *mut Option<String> as *mut std::ffi::c_void,
            set,
        )
    };
    if let Some(e) = crate::host::take_error(e) {
        return Err(CoreError::new(
            e.kind,
            format!("auto-complete failed: {}", e.message),
        ));
    }
    let Some(json) = completed else {
        return Ok(cfg);
    };
    let mut new = config::parse_json(&json)
        .map_err(|e| CoreError::invalid(format!("the backend's auto-completed config: {e}")))?;
    let file = dir.join("config.pbtxt");
    config::normalize(&mut new, &file, "", &cfg.name, gpu_count())
        .map_err(|e| CoreError::invalid(format!("the backend's auto-completed config: {e}")))?;
    Ok(new)
}

fn available_versions(model_dir: &Path) -> Vec<i64> {
    let mut v: Vec<i64> = std::fs::read_dir(model_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str()?.parse::<i64>().ok())
                .filter(|&v| v >= 0)
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

fn select_versions(cfg: &ModelConfig, available: &[i64]) -> Vec<i64> {
    match cfg
        .version_policy
        .as_ref()
        .and_then(|p| p.policy_choice.as_ref())
    {
        Some(PolicyChoice::All(_)) => available.to_vec(),
        Some(PolicyChoice::Specific(s)) => available
            .iter()
            .copied()
            .filter(|v| s.versions.contains(v))
            .collect(),
        Some(PolicyChoice::Latest(l)) => {
            let n = l.num_versions.max(1) as usize;
            available.iter().rev().take(n).rev().copied().collect()
        }
        None => available.iter().rev().take(1).copied().collect(),
    }
}

impl ModelManager {
    /// A manager over `opts.repository`; nothing is loaded yet.
    /// Its models also answer backends' BLS requests.
    pub fn new(opts: RepositoryOptions) -> Self {
        let models: Models = Arc::new(RwLock::new(BTreeMap::new()));
        crate::bls::serve_from(&models);
        ModelManager {
            opts,
            models,
            locks: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(BTreeMap::new()),
            overrides: Mutex::new(BTreeMap::new()),
        }
    }

    /// Options in force.
    pub fn options(&self) -> &RepositoryOptions {
        &self.opts
    }

    /// Model directory names in the repositories (a name in two is served from the first).
    pub fn repository_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .opts
            .repositories
            .iter()
            .flat_map(|repo| {
                std::fs::read_dir(repo)
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .filter(|e| e.path().is_dir())
                            .filter_map(|e| e.file_name().to_str().map(str::to_string))
                            .filter(|n| !n.starts_with('.'))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Loads the models the control mode asks for at start. Failures are recorded as
    /// UNAVAILABLE states and logged; they never stop the others.
    pub fn load_startup_models(&self) {
        let names = match self.opts.control_mode {
            ControlMode::None | ControlMode::Poll => self.repository_models(),
            ControlMode::Explicit if self.opts.startup_models.iter().any(|m| m == "*") => {
                self.repository_models()
            }
            ControlMode::Explicit => self.opts.startup_models.clone(),
        };
        if self.opts.control_mode == ControlMode::Poll {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for n in &names {
                seen.insert(n.clone(), fingerprint(&self.opts.model_dir(n)));
            }
        }
        self.load_in_order(names);
    }

    /// The folder model `name` loads from: the files its last load request sent, if it
    /// sent any, else its folder in the repositories.
    fn dir_of(&self, name: &str) -> PathBuf {
        self.overrides
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.opts.model_dir(name))
    }

    /// Triton's load with an override: `files` (`<version>/<file>` paths and their bytes)
    /// become the model's folder, with `config` (JSON) as its config; the model need not
    /// be in the repositories. A later load without files goes back to the repository.
    pub fn load_files(
        &self,
        name: &str,
        config: Option<&str>,
        files: &[(String, Vec<u8>)],
    ) -> CoreResult<()> {
        if files.is_empty() {
            self.overrides
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            return self.load(name, config);
        }
        let Some(config) = config else {
            return Err(CoreError::invalid(format!(
                "failed to load '{name}': the 'config' parameter must be given with model files"
            )));
        };
        if name.is_empty() || name.contains('/') || name.contains("..") {
            return Err(CoreError::invalid(format!("invalid model name '{name}'")));
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = sent_files_root().join(format!("{name}-{n}"));
        for (path, bytes) in files {
            let rel = Path::new(path);
            let safe = rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !safe || path.is_empty() {
                return Err(CoreError::invalid(format!(
                    "failed to load '{name}': model file path '{path}' must be relative to the model folder"
                )));
            }
            let target = dir.join(rel);
            let written = target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&target, bytes));
            if let Err(e) = written {
                return Err(CoreError::internal(format!(
                    "failed to load '{name}': cannot write model file '{path}': {e}"
                )));
            }
        }
        let previous = self
            .overrides
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), dir);
        let result = self.load(name, Some(config));
        if result.is_err() {
            let mut overrides = self.overrides.lock().unwrap_or_else(|p| p.into_inner());
            match previous {
                Some(p) => overrides.insert(name.to_string(), p),
                None => overrides.remove(name),
            };
        }
        result
    }

    /// The lock that `name`'s loads and unloads take.
    fn model_lock(&self, name: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    /// Loads `names`, up to `load_threads` at a time, ensembles after the models they
    /// run; failures are logged.
    fn load_in_order(&self, names: Vec<String>) {
        let (ensembles, plain): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| {
            let dir = self.dir_of(n);
            read_config(&self.opts.config_file(&dir), &dir, n, None)
                .is_ok_and(|c| ensemble::is_ensemble(&c))
        });
        for group in [plain, ensembles] {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let load_next = || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(name) = group.get(i) else { break };
                match self.load(name, None) {
                    Ok(()) => tracing::info!(model = %name, "model loaded"),
                    Err(e) => tracing::error!(model = %name, "failed to load: {}", e.message),
                }
            };
            let threads = self.opts.load_threads.clamp(1, group.len().max(1));
            std::thread::scope(|scope| {
                for _ in 1..threads {
                    scope.spawn(load_next);
                }
                load_next();
            });
        }
    }

    /// Poll mode's look at the repositories: models whose folder appeared or changed
    /// (any file's name, size or modification time) are loaded again, and models whose
    /// folder is gone are unloaded and forgotten.
    pub fn poll(&self) {
        let names = self.repository_models();
        let (changed, gone) = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<String> = seen
                .keys()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect();
            for n in &gone {
                seen.remove(n);
            }
            let mut changed = Vec::new();
            for n in &names {
                let now = fingerprint(&self.opts.model_dir(n));
                if seen.insert(n.clone(), now) != Some(now) {
                    changed.push(n.clone());
                }
            }
            (changed, gone)
        };
        for n in gone {
            tracing::info!(model = %n, "model folder removed: unloading");
            if let Err(e) = self.unload(&n) {
                tracing::error!(model = %n, "failed to unload: {}", e.message);
            }
            self.models_write().remove(&n);
        }
        if !changed.is_empty() {
            tracing::info!(models = ?changed, "model folders new or changed: loading");
            self.load_in_order(changed);
        }
    }

    fn models_read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, BTreeMap<i64, VersionState>>> {
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    fn models_write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, BTreeMap<i64, VersionState>>> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads (or reloads) model `name`, optionally with a JSON config instead of config.pbtxt.
    pub fn load(&self, name: &str, config_override: Option<&str>) -> CoreResult<()> {
        let lock = self.model_lock(name);
        let _turn = lock.lock().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() || name.contains('/') || name.contains("..") {
            return Err(CoreError::invalid(format!("invalid model name '{name}'")));
        }
        let dir = self.dir_of(name);
        if !dir.is_dir() {
            return Err(CoreError::invalid(format!(
                "failed to load '{name}': no model directory '{}' in the model repository",
                dir.display()
            )));
        }
        // As Triton: loading an ensemble loads the composing models that are not ready.
        if let Ok(cfg) = read_config(&self.opts.config_file(&dir), &dir, name, config_override) {
            for m in ensemble::composing_models(&cfg) {
                let dir = self.dir_of(&m);
                if m == name {
                    continue;
                }
                let lock = self.model_lock(&m);
                let _turn = lock.lock().unwrap_or_else(|p| p.into_inner());
                if self.get(&m, None).is_err() && dir.is_dir() {
                    if let Err(e) = self.load_versions(&m, &dir, None) {
                        tracing::error!(model = %m, "failed to load: {}", e.message);
                    }
                }
            }
        }
        let result = self.load_versions(name, &dir, config_override);
        if let Err(e) = &result {
            let mut models = self.models_write();
            let slot = models.entry(name.to_string()).or_default();
            if slot.is_empty() {
                slot.insert(
                    available_versions(&dir).last().copied().unwrap_or(1),
                    VersionState::Unavailable(e.message.clone()),
                );
            }
        }
        result
    }

    /// The model's config (read, then auto-completed from the newest selected version's
    /// files, as Triton does) and the versions its policy selects; the error says why not.
    fn prepare(
        &self,
        name: &str,
        dir: &Path,
        config_override: Option<&str>,
    ) -> Result<(ModelConfig, Vec<i64>), String> {
        let cfg = read_config(&self.opts.config_file(dir), dir, name, config_override)
            .map_err(|e| e.message)?;
        let versions = select_versions(&cfg, &available_versions(dir));
        let Some(&newest) = versions.iter().max() else {
            return Err(format!(
                "at least one version must be available under the version policy of model '{name}'"
            ));
        };
        if ensemble::is_ensemble(&cfg) {
            return Ok((cfg, versions));
        }
        let cfg = loader::find_and_open(&cfg.backend, dir, newest, &self.opts.backend_directory)
            .map_err(|e| CoreError::invalid(e.to_string()))
            .and_then(|lib| {
                if self.opts.autocomplete {
                    autocomplete(cfg, &lib, dir, newest)
                } else {
                    Ok(cfg)
                }
            })
            .map_err(|e| e.message)?;
        Ok((cfg, versions))
    }

    fn load_versions(
        &self,
        name: &str,
        dir: &Path,
        config_override: Option<&str>,
    ) -> CoreResult<()> {
        let fail = |msg: String, old: Vec<Arc<ModelVersion>>, me: &Self| {
            let mut models = me.models_write();
            let slot = models.entry(name.to_string()).or_default();
            for v in slot.values_mut() {
                if !matches!(v, VersionState::Ready(_)) {
                    *v = VersionState::Unavailable(msg.clone());
                }
            }
            drop(models);
            drop(old);
            CoreError::invalid(msg)
        };
        let (cfg, versions) = match self.prepare(name, dir, config_override) {
            Ok(prepared) => prepared,
            Err(msg) => {
                return Err(fail(
                    format!("failed to load '{name}': {msg}"),
                    vec![],
                    self,
                ))
            }
        };
        let mut loaded = BTreeMap::new();
        let mut first_error = None;
        for &v in &versions {
            self.models_write()
                .entry(name.to_string())
                .or_default()
                .insert(v, VersionState::Loading);
            let started = std::time::Instant::now();
            let r = if ensemble::is_ensemble(&cfg) {
                ensemble::Ensemble::new(&cfg, self.models.clone()).and_then(|e| {
                    Ok(ModelVersion::ensemble(
                        ModelShared::new(cfg.clone(), v, dir)?,
                        e,
                    ))
                })
            } else {
                loader::find_and_open(&cfg.backend, dir, v, &self.opts.backend_directory)
                    .map_err(|e| CoreError::invalid(e.to_string()))
                    .and_then(|lib| {
                        let shared = ModelShared::new(cfg.clone(), v, dir)?
                            .with_cache(self.opts.response_cache.as_ref());
                        ModelVersion::load(shared, dir, lib, self.opts.rate_limiter.as_ref())
                    })
            };
            match r {
                Ok(mv) => {
                    mv.set_load_duration(started.elapsed());
                    loaded.insert(v, VersionState::Ready(mv));
                }
                Err(e) => {
                    let msg = format!("failed to load '{name}' version {v}: {}", e.message);
                    tracing::error!("{msg}");
                    first_error.get_or_insert(msg.clone());
                    loaded.insert(v, VersionState::Unavailable(msg));
                }
            }
        }
        // Swap in the new versions, then retire the old ones outside the lock.
        let old = {
            let mut models = self.models_write();
            std::mem::replace(models.entry(name.to_string()).or_default(), loaded)
        };
        for (v, s) in old {
            if let VersionState::Ready(mv) = s {
                let still = matches!(self.models_read().get(name).and_then(|m| m.get(&v)), Some(VersionState::Ready(n)) if Arc::ptr_eq(n, &mv));
                if !still {
                    mv.shutdown();
                }
            }
        }
        match first_error {
            Some(e) => Err(CoreError::invalid(e)),
            None => Ok(()),
        }
    }

    /// Removes the folders written for load requests that sent files (at shutdown).
    pub fn remove_sent_files(&self) {
        let root = sent_files_root();
        if root.is_dir() {
            if let Err(e) = std::fs::remove_dir_all(&root) {
                tracing::warn!("cannot remove '{}': {e}", root.display());
            }
        }
    }

    /// Unloads every version of `name`; in-flight and queued requests finish first.
    pub fn unload(&self, name: &str) -> CoreResult<()> {
        let lock = self.model_lock(name);
        let _turn = lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = {
            let mut models = self.models_write();
            let Some(slot) = models.get_mut(name) else {
                if self.dir_of(name).is_dir() {
                    return Ok(());
                }
                return Err(CoreError::invalid(format!(
                    "failed to unload '{name}': model not found in the repository"
                )));
            };
            let old = std::mem::take(slot);
            for v in old.keys() {
                slot.insert(*v, VersionState::Unavailable("unloaded".into()));
            }
            old
        };
        for s in old.into_values() {
            if let VersionState::Ready(mv) = s {
                mv.shutdown();
            }
        }
        Ok(())
    }

    /// Unloads `name`, then, as Triton's `unload_dependents`, the models it runs (an
    /// ensemble's composing models, and theirs) that no loaded ensemble still runs.
    pub fn unload_with_dependents(&self, name: &str) -> CoreResult<()> {
        let composing = self
            .get(name, None)
            .map(|mv| ensemble::composing_models(&mv.shared.config))
            .unwrap_or_default();
        self.unload(name)?;
        for m in composing {
            let still_run = self.ready_versions().iter().any(|mv| {
                ensemble::is_ensemble(&mv.shared.config)
                    && ensemble::composing_models(&mv.shared.config).contains(&m)
            });
            if !still_run {
                self.unload_with_dependents(&m)?;
            }
        }
        Ok(())
    }

    /// Unloads everything (server shutdown).
    pub fn unload_all(&self) {
        let names: Vec<String> = self.models_read().keys().cloned().collect();
        for n in names {
            let _ = self.unload(&n);
        }
    }

    /// The ready version to serve: `version` or the highest ready one.
    pub fn get(&self, name: &str, version: Option<i64>) -> CoreResult<Arc<ModelVersion>> {
        find(&self.models, name, version)
    }

    /// Versions of `name` and their states.
    pub fn versions(&self, name: &str) -> Vec<(i64, VersionState)> {
        self.models_read()
            .get(name)
            .map(|m| m.iter().map(|(v, s)| (*v, s.clone())).collect())
            .unwrap_or_default()
    }

    /// Every loaded (ready) version, for statistics.
    pub fn ready_versions(&self) -> Vec<Arc<ModelVersion>> {
        self.models_read()
            .values()
            .flat_map(|m| m.values())
            .filter_map(|s| match s {
                VersionState::Ready(mv) => Some(mv.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether every model that was asked to load is ready.
    pub fn all_ready(&self) -> bool {
        self.models_read()
            .values()
            .flat_map(|m| m.values())
            .all(|s| matches!(s, VersionState::Ready(_)))
    }

    /// Triton's repository index: every model in the repository and every known version.
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let models = self.models_read();
        let mut out = Vec::new();
        let mut names = self.repository_models();
        for n in models.keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.sort();
        for name in names {
            match models.get(&name).filter(|m| !m.is_empty()) {
                Some(versions) => {
                    for (v, s) in versions {
                        if ready_only && !matches!(s, VersionState::Ready(_)) {
                            continue;
                        }
                        let reason = match s {
                            VersionState::Unavailable(r) => r.clone(),
                            _ => String::new(),
                        };
                        out.push(IndexEntry {
                            name: name.clone(),
                            version: Some(*v),
                            state: Some(s.name()),
                            reason,
                        });
                    }
                }
                None if !ready_only => out.push(IndexEntry {
                    name,
                    version: None,
                    state: None,
                    reason: String::new(),
                }),
                None => {}
            }
        }
        out
    }
}
