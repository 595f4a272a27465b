//! Weights: memory-mapped safetensors checkpoints (single file or sharded) and the
//! [`WeightSource`] abstraction a model part loads its own tensors from.
//!
//! f32 and bf16 tensors are used in place from the mapping (no copy: peak memory stays near
//! the checkpoint's size, and processes on one node share the page cache); f16 tensors are
//! widened to f32 once at load. A model part may convert its matrices at load ([`Precision`]:
//! bf16, or 8-bit experts), and always widens vectors (norms, biases) to f32.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use safetensors::{Dtype as Stored, SafeTensors};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::{self, Mat};

/// Which part of a model a process owns: a contiguous layer range and a set of experts
/// within it. The ends of the model (embeddings; final norm and LM head) are owned when
/// the range starts at layer 0 / ends at the last layer, unless excluded explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub layers: Range<usize>,
    /// `None`: every expert of the owned layers.
    pub experts: Option<BTreeSet<usize>>,
    /// Attention, norms and routers of the owned layers (a stage's part).
    pub attention: bool,
    pub embeddings: bool,
    pub head: bool,
}

impl ShardSpec {
    /// The whole model in one process.
    pub fn full(cfg: &ModelConfig) -> Self {
        Self {
            layers: 0..cfg.num_hidden_layers,
            experts: None,
            attention: true,
            embeddings: true,
            head: true,
        }
    }

    /// A pipeline stage: attention and routers for `layers`, no experts.
    pub fn stage(cfg: &ModelConfig, layers: Range<usize>, with_experts: bool) -> Self {
        let embeddings = layers.start == 0;
        let head = layers.end == cfg.num_hidden_layers;
        Self {
            layers,
            experts: if with_experts {
                None
            } else {
                Some(BTreeSet::new())
            },
            attention: true,
            embeddings,
            head,
        }
    }

    /// An expert shard: the given experts of `layers`, nothing else.
    pub fn experts(layers: Range<usize>, experts: impl IntoIterator<Item = usize>) -> Self {
        Self {
            layers,
            experts: Some(experts.into_iter().collect()),
            attention: false,
            embeddings: false,
            head: false,
        }
    }

    /// The gateway's part: final norm and LM head only.
    pub fn head(cfg: &ModelConfig) -> Self {
        let n = cfg.num_hidden_layers;
        Self {
            layers: n..n,
            experts: Some(BTreeSet::new()),
            attention: false,
            embeddings: false,
            head: true,
        }
    }

    pub fn owns_expert(&self, layer: usize, expert: usize) -> bool {
        self.layers.contains(&layer) && self.experts.as_ref().is_none_or(|s| s.contains(&expert))
    }

    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let ends_only = self.layers.is_empty() && (self.embeddings || self.head);
        if (self.layers.start >= self.layers.end && !ends_only)
            || self.layers.end > cfg.num_hidden_layers
        {
            return Err(Error::invalid(
                "layers",
                format!(
                    "range {}..{} is empty or outside the model's {} layers",
                    self.layers.start, self.layers.end, cfg.num_hidden_layers
                ),
            ));
        }
        if let Some(e) = self
            .experts
            .as_ref()
            .and_then(|s| s.iter().find(|&&e| e >= cfg.num_local_experts))
        {
            return Err(Error::invalid(
                "experts",
                format!(
                    "expert {e} does not exist (the model has {})",
                    cfg.num_local_experts
                ),
            ));
        }
        Ok(())
    }
}

/// How a weight is held in memory (and read by the kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    /// 8-bit blocks of [`kernels::Q8_BLOCK`] weights with one f32 scale each.
    Q8,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::Q8 => "q8",
        }
    }

    /// Bytes per weight (8-bit: scales included).
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Dtype::F32 => 4.0,
            Dtype::Bf16 => 2.0,
            Dtype::Q8 => kernels::Q8_BYTES_PER_WEIGHT,
        }
    }
}

/// What a weight-format option asks for: keep the checkpoint's format (`auto`: f32 stays
/// f32, bf16 stays bf16, f16 is widened to f32), or convert to one at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    #[default]
    Auto,
    Is(Dtype),
}

impl std::str::FromStr for DtypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" | "" => DtypeChoice::Auto,
            "f32" | "float32" => DtypeChoice::Is(Dtype::F32),
            "bf16" | "bfloat16" => DtypeChoice::Is(Dtype::Bf16),
            "q8" | "q8_0" | "int8" => DtypeChoice::Is(Dtype::Q8),
            other => {
                return Err(Error::invalid(
                    "dtype",
                    format!("`{other}` is not one of auto, f32, bf16, q8"),
                ));
            }
        })
    }
}

impl std::fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DtypeChoice::Auto => f.write_str("auto"),
            DtypeChoice::Is(d) => f.write_str(d.name()),
        }
    }
}

/// The formats a model part keeps its matrices in. Vectors (norms, biases) and the few
/// matrices read outside the matrix kernels are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Precision {
    /// Attention, routers, dense and shared MLPs, embeddings and the LM head.
    pub weights: DtypeChoice,
    /// Routed experts (`auto`: as `weights`).
    pub experts: DtypeChoice,
}

impl Precision {
    /// The format a matrix stored as `stored` is kept in.
    pub fn matrix(&self, stored: Dtype, expert: bool) -> Dtype {
        let choice = match (expert, self.experts) {
            (true, DtypeChoice::Is(d)) => DtypeChoice::Is(d),
            _ => self.weights,
        };
        match choice {
            DtypeChoice::Auto => stored,
            DtypeChoice::Is(d) => d,
        }
    }
}

/// A read-only tensor: a view into a checkpoint mapping (f32 or bf16 as stored), or owned
/// memory (f32, bf16 or 8-bit blocks).
#[derive(Clone)]
pub struct Weight {
    data: WeightData,
    shape: Vec<usize>,
}

#[derive(Clone)]
enum WeightData {
    Mapped {
        map: Arc<Mmap>,
        range: Range<usize>,
        dtype: Dtype,
    },
    Owned(Arc<Vec<f32>>),
    OwnedBf16(Arc<Vec<u16>>),
    Q8 {
        q: Arc<Vec<i8>>,
        d: Arc<Vec<f32>>,
    },
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_mapped() { "mapped" } else { "owned" };
        write!(
            f,
            "Weight({kind} {}, {:?})",
            self.dtype().name(),
            self.shape
        )
    }
}

impl Weight {
    pub fn owned(data: Vec<f32>, shape: Vec<usize>) -> Self {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Self {
            data: WeightData::Owned(Arc::new(data)),
            shape,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> Dtype {
        match &self.data {
            WeightData::Mapped { dtype, .. } => *dtype,
            WeightData::Owned(_) => Dtype::F32,
            WeightData::OwnedBf16(_) => Dtype::Bf16,
            WeightData::Q8 { .. } => Dtype::Q8,
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn bytes(&self) -> u64 {
        (self.len() as f64 * self.dtype().bytes_per_weight()).round() as u64
    }

    /// The values of an f32 weight.
    ///
    /// # Panics
    /// If the weight is held in another format: vectors are always loaded as f32, and
    /// matrices are read through [`Weight::mat`].
    pub fn as_slice(&self) -> &[f32] {
        match &self.data {
            // Alignment and length were checked when the view was made.
            WeightData::Mapped {
                map,
                range,
                dtype: Dtype::F32,
            } => bytemuck::cast_slice(&map[range.clone()]),
            WeightData::Owned(v) => v,
            _ => panic!(
                "weight {:?} is held as {}; read it with mat() or convert(Dtype::F32) it",
                self.shape,
                self.dtype().name()
            ),
        }
    }

    fn bf16_bits(&self) -> Option<&[u16]> {
        match &self.data {
            WeightData::Mapped {
                map,
                range,
                dtype: Dtype::Bf16,
            } => Some(bytemuck::cast_slice(&map[range.clone()])),
            WeightData::OwnedBf16(v) => Some(v),
            _ => None,
        }
    }

    /// The weight as the matrix kernels read it.
    pub fn mat(&self) -> Mat<'_> {
        match &self.data {
            WeightData::Q8 { q, d } => Mat::Q8 { q, d },
            _ => match self.bf16_bits() {
                Some(b) => Mat::Bf16(b),
                None => Mat::F32(self.as_slice()),
            },
        }
    }

    /// Row `r` of a matrix, widened into `out` (its length is the row's).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let k = out.len();
        match self.mat() {
            Mat::F32(v) => out.copy_from_slice(&v[r * k..(r + 1) * k]),
            m => {
                for (c, o) in out.iter_mut().enumerate() {
                    *o = m.get(r * k + c);
                }
            }
        }
    }

    /// This weight in `dtype`. Widening to f32 is exact; narrowing rounds (bf16: to nearest
    /// even; 8-bit: per block, see [`kernels::quantize_q8`]). 8-bit needs a matrix whose
    /// rows are whole blocks; anything else keeps its format.
    pub fn convert(self, dtype: Dtype) -> Weight {
        if self.dtype() == dtype || self.is_empty() {
            return self;
        }
        let shape = self.shape.clone();
        let n = self.len();
        let k = shape.last().copied().unwrap_or(0);
        if dtype == Dtype::Q8 && (shape.len() != 2 || k % kernels::Q8_BLOCK != 0) {
            return self;
        }
        let src = self.mat();
        let at = |i: usize| src.get(i);
        let converted = match dtype {
            Dtype::F32 => Weight::owned((0..n).map(at).collect(), shape),
            Dtype::Bf16 => Weight {
                data: WeightData::OwnedBf16(Arc::new(
                    (0..n).map(|i| kernels::to_bf16(at(i))).collect(),
                )),
                shape,
            },
            Dtype::Q8 => {
                let (q, d) = kernels::quantize_q8(at, shape[0], k);
                Weight {
                    data: WeightData::Q8 {
                        q: Arc::new(q),
                        d: Arc::new(d),
                    },
                    shape,
                }
            }
        };
        self.release();
        converted
    }

    /// Drops the resident pages of a mapped weight that is no longer read (converted at
    /// load), so they do not count against the process: the page cache keeps them for
    /// other processes.
    pub(crate) fn release(&self) {
        if let WeightData::Mapped { map, range, .. } = &self.data {
            const PAGE: usize = 4096;
            let (a, b) = (range.start.next_multiple_of(PAGE), range.end / PAGE * PAGE);
            if a < b {
                // SAFETY: the mapping is read-only and private to this process: dropped
                // pages read back from the file unchanged on the next access.
                #[allow(unsafe_code)]
                let _ = unsafe {
                    map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
                };
            }
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self.data, WeightData::Mapped { .. })
    }

    /// Faults the tensor's pages in now, so the first request does not pay for it.
    pub fn prefault(&self) -> f32 {
        match self.mat() {
            Mat::F32(v) => v.iter().step_by(1024).sum(),
            Mat::Bf16(v) => v.iter().step_by(2048).map(|&b| kernels::from_bf16(b)).sum(),
            Mat::Q8 { q, .. } => q.iter().step_by(4096).map(|&v| v as f32).sum(),
        }
    }
}

/// Where a model part's tensors come from.
pub trait WeightSource: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// Loads one tensor as f32, checking its shape.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Weight>;

    /// Loads entry `index` of a tensor's first dimension (one expert of a fused expert
    /// tensor), `shape` being the whole tensor's; the result has shape `shape[1..]`.
    fn load_slice(&self, name: &str, shape: &[usize], index: usize) -> Result<Weight> {
        let _ = (shape, index);
        Err(Error::tensor(
            name,
            format!("{} holds no fused tensors", self.describe()),
        ))
    }

    /// Whether the source has the tensor (used for optional tensors such as a tied LM head).
    fn contains(&self, name: &str) -> bool;

    /// A short description for logs.
    fn describe(&self) -> String;
}

struct MappedFile {
    map: Arc<Mmap>,
    data_start: usize,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
}

/// A Hugging Face checkpoint folder: `config.json` plus `model.safetensors`, or shards
/// listed in `model.safetensors.index.json`. Files are opened and mapped only when a tensor
/// they hold is first loaded.
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    /// tensor name -> file name
    index: HashMap<String, String>,
    files: Mutex<HashMap<String, Arc<MappedFile>>>,
    loaded: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::checkpoint(
                dir,
                "not a folder (expected a checkpoint folder with config.json)",
            ));
        }
        let config = ModelConfig::from_dir(dir)?;
        let index_path = dir.join(INDEX_FILE);
        let index = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(&index_path, format!("invalid JSON: {e}")))?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::checkpoint(&index_path, "missing `weight_map` object"))?;
            map.iter()
                .map(|(k, v)| {
                    v.as_str()
                        .map(|f| (k.clone(), f.to_string()))
                        .ok_or_else(|| {
                            Error::checkpoint(
                                &index_path,
                                format!("weight_map[`{k}`] is not a file name"),
                            )
                        })
                })
                .collect::<Result<HashMap<_, _>>>()?
        } else {
            let single = dir.join(SINGLE_FILE);
            let file = Self::map_file(&single)?;
            let index = file
                .tensors
                .keys()
                .map(|k| (k.clone(), SINGLE_FILE.to_string()))
                .collect();
            let files = HashMap::from([(SINGLE_FILE.to_string(), Arc::new(file))]);
            return Ok(Self {
                dir: dir.to_path_buf(),
                config,
                index,
                files: Mutex::new(files),
                loaded: Mutex::new(Vec::new()),
            });
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            index,
            files: Mutex::new(HashMap::new()),
            loaded: Mutex::new(Vec::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names of the tensors loaded so far, in order.
    pub fn loaded_tensors(&self) -> Vec<String> {
        self.loaded.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Opens every weights file of the checkpoint and reads its header: that they exist, are
    /// readable and are safetensors (what a loader would find out only when it gets there).
    pub fn check_files(&self) -> Result<()> {
        let names: BTreeSet<&String> = self.index.values().collect();
        for name in names {
            let path = self.dir.join(name);
            let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let mut len = [0u8; 8];
            std::io::Read::read_exact(&mut f, &mut len).map_err(|e| Error::io(&path, e))?;
            let n = u64::from_le_bytes(len);
            let size = f.metadata().map_err(|e| Error::io(&path, e))?.len();
            if n == 0 || n > size.saturating_sub(8) || n > 100 << 20 {
                return Err(Error::checkpoint(
                    &path,
                    "not a valid safetensors file (header length)",
                ));
            }
        }
        Ok(())
    }

    /// Files opened so far.
    pub fn opened_files(&self) -> BTreeSet<String> {
        self.files
            .lock()
            .map(|f| f.keys().cloned().collect())
            .unwrap_or_default()
    }

    #[allow(unsafe_code)]
    fn map_file(path: &Path) -> Result<MappedFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: checkpoints are treated as immutable while served; truncating or rewriting
        // a mapped file underneath a running process is outside the supported contract.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| Error::checkpoint(path, format!("not a valid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(MappedFile {
            map: Arc::new(map),
            data_start,
            tensors,
        })
    }

    fn file_for(&self, name: &str) -> Result<Arc<MappedFile>> {
        let file_name = self.index.get(name).ok_or_else(|| {
            Error::tensor(
                name,
                format!("not found in checkpoint {}", self.dir.display()),
            )
        })?;
        let mut files = self
            .files
            .lock()
            .map_err(|_| Error::tensor(name, "loader lock poisoned"))?;
        if let Some(f) = files.get(file_name) {
            return Ok(f.clone());
        }
        let file = Arc::new(Self::map_file(&self.dir.join(file_name))?);
        files.insert(file_name.clone(), file.clone());
        Ok(file)
    }
}

impl WeightSource for Checkpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.load_part(name, shape, None)
    }

    fn load_slice(&self, name: &str, shape: &[usize], index: usize) -> Result<Weight> {
        self.load_part(name, shape, Some(index))
    }
}

impl Checkpoint {
    /// Loads a whole tensor of `shape`, or entry `index` of its first dimension.
    fn load_part(&self, name: &str, shape: &[usize], index: Option<usize>) -> Result<Weight> {
        let file = self.file_for(name)?;
        let info = file
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(name, "listed in the index but missing from its file"))?;
        if info.shape != shape {
            return Err(Error::tensor(
                name,
                format!(
                    "shape mismatch: checkpoint has {:?}, config implies {:?}",
                    info.shape, shape
                ),
            ));
        }
        let (begin, end) = info.data_offsets;
        let elem_size = match info.dtype {
            Stored::F32 => 4,
            Stored::F16 | Stored::BF16 => 2,
            Stored::U8 if name.ends_with("_blocks") || name.ends_with("_scales") => {
                return Err(Error::tensor(
                    name,
                    "MXFP4-quantized experts are not supported yet; use a bf16 checkpoint",
                ));
            }
            other => {
                return Err(Error::tensor(
                    name,
                    format!("unsupported dtype {other:?} (expected F32, F16 or BF16)"),
                ));
            }
        };
        let elems: usize = shape.iter().product();
        if end - begin != elems * elem_size {
            return Err(Error::tensor(
                name,
                format!(
                    "holds {} bytes, expected {}",
                    end - begin,
                    elems * elem_size
                ),
            ));
        }
        let (range, out_shape) = match index {
            None => (
                file.data_start + begin..file.data_start + end,
                shape.to_vec(),
            ),
            Some(i) => {
                let rows = shape.first().copied().unwrap_or(0);
                if i >= rows {
                    return Err(Error::tensor(
                        name,
                        format!("entry {i} is outside its first dimension ({rows})"),
                    ));
                }
                let part = shape[1..].iter().product::<usize>() * elem_size;
                let at = file.data_start + begin + i * part;
                (at..at + part, shape[1..].to_vec())
            }
        };
        let bytes = file
            .map
            .get(range.clone())
            .ok_or_else(|| Error::tensor(name, "data offsets point outside the file"))?;
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.push(match index {
                None => name.to_string(),
                Some(i) => format!("{name}[{i}]"),
            });
        }
        let mapped = |dtype| Weight {
            data: WeightData::Mapped {
                map: file.map.clone(),
                range: range.clone(),
                dtype,
            },
            shape: out_shape.clone(),
        };
        let little = cfg!(target_endian = "little");
        let weight = match info.dtype {
            Stored::F32 if little && bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok() => {
                mapped(Dtype::F32)
            }
            Stored::BF16 if little && bytemuck::try_cast_slice::<u8, u16>(bytes).is_ok() => {
                mapped(Dtype::Bf16)
            }
            Stored::F32 => Weight::owned(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                out_shape,
            ),
            Stored::F16 => Weight::owned(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                out_shape,
            ),
            _ => Weight {
                data: WeightData::OwnedBf16(Arc::new(
                    bytes
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                )),
                shape: out_shape,
            },
        };
        Ok(weight)
    }
}

/// Hub tensor names of the Mixtral family.
pub mod names {
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const FINAL_NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";

    pub fn layer(i: usize, rest: &str) -> String {
        format!("model.layers.{i}.{rest}")
    }

    pub fn expert(i: usize, e: usize, w: &str) -> String {
        format!("model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight")
    }

    pub fn router(i: usize) -> String {
        layer(i, "block_sparse_moe.gate.weight")
    }
}
