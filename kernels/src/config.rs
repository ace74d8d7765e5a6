//! Comptime tile configurations and their selection from the device's limits.

use cubecl::ir::{ElemType, FloatKind, StorageType, features::MmaConfig};
use cubecl::prelude::*;

/// How a kernel computes its matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Strategy {
    /// Tensor cores where the runtime has them for the input dtype and the shapes fit (on
    /// CUDA through manually managed `mma.sync`, elsewhere through `cmma`), else register
    /// tiles on the FMA units.
    #[default]
    Auto,
    /// Register tiles on the FMA units (every runtime; the only path for f32 inputs).
    Fma,
    /// Tensor cores; falls back to [`Strategy::Fma`] where unsupported.
    Mma,
    /// Tensor cores through `cmma` only: the kernels HIP and Vulkan run, also on CUDA (where
    /// [`Strategy::Auto`] takes the manually managed `mma` kernels); falls back to
    /// [`Strategy::Fma`] where unsupported.
    Cmma,
}

/// Whether `client` runs 16×16×16 `cmma` with `dtype` operands and an `f32` accumulator.
pub fn mma_supported<R: Runtime>(client: &ComputeClient<R>, dtype: StorageType) -> bool {
    let half = matches!(
        dtype,
        StorageType::Scalar(ElemType::Float(FloatKind::F16 | FloatKind::BF16))
    );
    half && client.features().matmul.cmma.contains(&MmaConfig {
        a_type: dtype,
        b_type: dtype,
        cd_type: f32::as_type_native_unchecked().storage_type(),
        m: 16,
        n: 16,
        k: 16,
    })
}

/// Shared memory the FMA kernels may plan for: the device's limit, capped at the 48 KiB every
/// CUDA/HIP/Vulkan device gives without an opt-in.
pub fn shared_memory_budget(max_shared_bytes: usize) -> usize {
    max_shared_bytes.min(48 * 1024)
}

/// The device's shared-memory limit (what the tensor-core kernels may use; CUDA opts in).
fn shared_memory_max<R: Runtime>(client: &ComputeClient<R>) -> usize {
    client.properties().hardware.max_shared_memory_size
}

/// Whether the tensor-core variants apply: `strategy` allows them, `d % 16 == 0`,
/// `e % 32 == 0`, and the runtime has `cmma` for `dtype` and for each of `extra`.
fn use_mma<R: Runtime>(
    client: &ComputeClient<R>,
    strategy: Strategy,
    dtype: StorageType,
    extra: &[StorageType],
    head_dim: usize,
    value_dim: usize,
) -> bool {
    strategy != Strategy::Fma
        && head_dim % 16 == 0
        && value_dim % 32 == 0
        && mma_supported(client, dtype)
        && extra.iter().all(|&t| mma_supported(client, t))
}

/// Tiles of the output kernel (query-state product + intra-chunk attention + normalisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutputTiles {
    /// Query rows per cube.
    pub block_q: u32,
    /// Keys (and features) per inner block.
    pub block_k: u32,
    /// Units per cube; `threads / block_q` units share a row.
    pub threads: u32,
    /// `d`.
    pub head_dim: u32,
    /// `e`.
    pub value_dim: u32,
    /// `p`.
    pub degree: u32,
    /// Whether log-gates are given (set at launch from the arguments).
    pub gated: bool,
    /// Whether the chunk's incoming state is read (chunked form) or not (attention form); set
    /// at launch from the arguments.
    pub with_state: bool,
    /// Whether each row's normaliser `L_i` is written (set at launch from the arguments; FMA
    /// variant only).
    pub with_stats: bool,
    /// Whether the tensor-core variant runs.
    pub mma: bool,
    /// Whether the tensor-core variant runs on CUDA's manually managed `mma`
    /// (`chunk_output_manual`: scores and weights in registers) rather than `cmma`.
    pub manual: bool,
}

impl OutputTiles {
    /// Tiles for inputs of `dtype` on `client`: the tensor-core variant where `strategy` and
    /// the device allow it, else the largest FMA tiles that fit in shared memory; `None` when
    /// none fit (head dims too large for this device): run the reference instead.
    pub fn plan<R: Runtime>(
        client: &ComputeClient<R>,
        dtype: StorageType,
        strategy: Strategy,
        head_dim: usize,
        value_dim: usize,
        degree: usize,
    ) -> Option<Self> {
        let tiles = |block_q: usize, block_k: usize, mma: bool, manual: bool| Self {
            block_q: block_q as u32,
            block_k: block_k as u32,
            threads: 256,
            head_dim: head_dim as u32,
            value_dim: value_dim as u32,
            degree: degree as u32,
            gated: false,
            with_state: false,
            with_stats: false,
            mma,
            manual,
        };
        let bf16 = half::bf16::as_type_native_unchecked().storage_type();
        if use_mma(client, strategy, dtype, &[bf16], head_dim, value_dim)
            && value_dim <= 128
            && crate::chunk_output_mma::shared_bytes(head_dim, value_dim, dtype.size())
                <= shared_memory_max(client)
        {
            let manual = manual_mma_allowed(client, strategy)
                && crate::chunk_output_manual::shared_bytes(head_dim, value_dim, dtype.size())
                    <= shared_memory_max(client);
            return Some(tiles(crate::chunk_output_mma::BQ, 64, true, manual));
        }
        let budget = shared_memory_budget(shared_memory_max(client));
        [(64, 64), (64, 32), (32, 32), (32, 16), (16, 16), (16, 8)]
            .into_iter()
            .find(|&(bq, bk)| Self::fma_shared_bytes(bq, bk, head_dim, value_dim) <= budget)
            .map(|(bq, bk)| tiles(bq, bk, false, false))
    }

    fn fma_shared_bytes(bq: usize, bk: usize, d: usize, e: usize) -> usize {
        4 * (bq * (d + 1) + bk * (d + 1) + bk * e + bq * bk + 3 * bk + bq)
    }
}

/// Tiles of the chunked form's kernels, planned together: the tensor-core output kernel takes
/// its state part from the query-state kernel, so it is chosen only where that kernel fits;
/// otherwise the FMA output kernel computes the state part itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkedTiles {
    /// Chunk contributions `ΔS`, `Δz`.
    pub state: StateTiles,
    /// Query–state product (`None`: inside the FMA output kernel).
    pub query: Option<QueryStateTiles>,
    /// Intra-chunk part and normalisation.
    pub output: OutputTiles,
}

impl ChunkedTiles {
    /// Tiles for degree 2, inputs of `dtype` on `client`; `None` when some kernel does not fit
    /// (run the reference instead).
    pub fn plan<R: Runtime>(
        client: &ComputeClient<R>,
        dtype: StorageType,
        strategy: Strategy,
        head_dim: usize,
        value_dim: usize,
    ) -> Option<Self> {
        let state = StateTiles::plan(client, dtype, strategy, head_dim, value_dim)?;
        let query = QueryStateTiles::plan(client, dtype, strategy, head_dim, value_dim);
        let output_strategy = if query.is_some() {
            strategy
        } else {
            Strategy::Fma
        };
        let output = OutputTiles::plan(client, dtype, output_strategy, head_dim, value_dim, 2)?;
        // both or neither: the tensor-core output kernel has no state loop of its own
        let query = query.filter(|_| output.mma);
        Some(Self {
            state,
            query,
            output,
        })
    }
}

/// Tiles of the tensor-core query-state kernel (`φ_Q(q̃)ᵀ S_in`, `φ_Q(q̃)·z_in`), which the
/// chunked form runs beside the tensor-core output kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueryStateTiles {
    /// `d` (a multiple of 16).
    pub head_dim: u32,
    /// `e` (a multiple of 32, at most 128).
    pub value_dim: u32,
    /// Whether the product runs on CUDA's manually managed `mma`
    /// (`query_state_outer`) rather than `cmma`.
    pub outer: bool,
    /// `query_state_outer`'s planes per cube (16 rows each): every cube streams the chunk's
    /// whole `S/γ` through L2, so large states want more rows per cube.
    pub planes: u32,
}

impl QueryStateTiles {
    /// Tiles for inputs of `dtype` on `client`: `None` unless the tensor cores take `dtype`
    /// and f16 operands, `d % 16 == 0`, `e % 32 == 0`, `e ≤ 128` and the tiles fit in shared
    /// memory (the chunked form then runs the state product inside the output kernel).
    pub fn plan<R: Runtime>(
        client: &ComputeClient<R>,
        dtype: StorageType,
        strategy: Strategy,
        head_dim: usize,
        value_dim: usize,
    ) -> Option<Self> {
        let f16 = half::f16::as_type_native_unchecked().storage_type();
        if !use_mma(client, strategy, dtype, &[f16], head_dim, value_dim) || value_dim > 128 {
            return None;
        }
        let max = shared_memory_max(client);
        // 256 rows per cube where the state is large (d = 128: 2.4 MB per chunk and head
        // streamed by each cube; Brumby's heads 55.6 → 51.4 ms forward on an H200), 128 where
        // it is not (d = 64: 3.59 → 3.93 ms with 256, fewer cubes to spread)
        let planes = if head_dim > 64 { 16 } else { 8 };
        let outer = manual_mma_allowed(client, strategy)
            && head_dim <= 128
            && crate::query_state_outer::shared_bytes(planes, head_dim, value_dim) <= max;
        (outer || Self::shared_bytes(head_dim, value_dim) <= max).then_some(Self {
            head_dim: head_dim as u32,
            value_dim: value_dim as u32,
            outer,
            planes,
        })
    }

    /// Shared memory of one cube, in bytes (the query tile is staged as f16 whatever the
    /// input dtype).
    pub fn shared_bytes(head_dim: usize, value_dim: usize) -> usize {
        use crate::block_mma::{A_STRIDE, DEPTH, ROWS, STAGE, UNITS, b_stride};
        2 * ROWS * (head_dim + 8)
            + 2 * (2 * ROWS * A_STRIDE + 2 * DEPTH * b_stride(value_dim))
            + 4 * (ROWS + UNITS + STAGE)
    }
}

/// How the state path of the backward row passes runs its products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateGradProducts {
    /// `cmma` tiles staged through shared memory, the feature gradients contracted with the
    /// coordinates on the FMA units ([`chunk_grad_state_mma`](crate::chunk_grad_state_mma)):
    /// every runtime with `cmma`.
    Staged,
    /// CUDA's manually managed `mma` on the feature tiles, the feature gradients contracted
    /// with the coordinates in the registers where the accumulators sit
    /// (`chunk_grad_state_manual`).
    Registers,
    /// CUDA's manually managed `mma` on the outer products `x ⊗ w` against the state written
    /// out as a `d × d × e` tensor (`chunk_grad_state_outer`): nothing per feature on the FMA
    /// units.
    Outer,
}

/// Tiles of the tensor-core state path of the backward row passes
/// ([`chunk_grad_state_mma`](crate::chunk_grad_state_mma)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateGradTiles {
    /// `d` (a multiple of 16).
    pub head_dim: u32,
    /// `e` (a multiple of 32, at most 128).
    pub value_dim: u32,
    /// Row tiles of 16 per cube (one plane each for [`StateGradProducts::Staged`]).
    pub planes: u32,
    /// [`StateGradProducts::Outer`]: the planes of a row tile split each product's columns
    /// into this many parts.
    pub parts: u32,
    /// Whether log-gates are given (set at launch from the arguments).
    pub gated: bool,
    /// Keys (`∂k`, `∂v`, key-side gate terms) or queries; set at launch.
    pub keys: bool,
    /// How the products run.
    pub products: StateGradProducts,
}

/// Whether the kernels on CUDA's manually managed `m16n8k16` MMA (f16 and bf16 operands, f32
/// accumulators, whose register layout they rely on) run: `strategy` is not
/// [`Strategy::Cmma`] and `client` is CUDA with those shapes (the chunk-state and query-state
/// products, the state path's [`StateGradProducts::Registers`] and
/// [`StateGradProducts::Outer`], the output kernel and the backward's intra-chunk pairs).
fn manual_mma_allowed<R: Runtime>(client: &ComputeClient<R>, strategy: Strategy) -> bool {
    let f32_type = f32::as_type_native_unchecked().storage_type();
    let shape = |operand: StorageType| MmaConfig {
        a_type: operand,
        b_type: operand,
        cd_type: f32_type,
        m: 16,
        n: 8,
        k: 16,
    };
    let mma = &client.features().matmul.mma;
    strategy != Strategy::Cmma
        && R::name(client) == "cuda"
        && mma.contains(&shape(half::f16::as_type_native_unchecked().storage_type()))
        && mma.contains(&shape(
            half::bf16::as_type_native_unchecked().storage_type(),
        ))
}

impl StateGradTiles {
    /// Tiles on `client`: `None` unless the tensor cores take f16 operands, `d % 16 == 0`,
    /// `e % 32 == 0`, `e ≤ 128` and a cube fits in shared memory. CUDA runs the outer
    /// products where `d, e ≤ 64` and the register-contracted ones above; other runtimes the
    /// staged ones.
    pub fn plan<R: Runtime>(
        client: &ComputeClient<R>,
        strategy: Strategy,
        head_dim: usize,
        value_dim: usize,
    ) -> Option<Self> {
        let f16 = half::f16::as_type_native_unchecked().storage_type();
        if !use_mma(client, strategy, f16, &[], head_dim, value_dim) || value_dim > 128 {
            return None;
        }
        let max = shared_memory_max(client);
        let manual = manual_mma_allowed(client, strategy);
        // the outer products multiply d·d·e per row where the feature tiles multiply D·e
        // (D = d(d + 16)/2) and stream the whole d × d × e state through each cube: they win
        // at d = 64 (the state path 2.1 ms faster at 8 heads, t = 16k, H200) and lose at
        // d = 128 (65 ms slower at Brumby's heads, its 40 query heads' cubes bound by L2)
        if manual && head_dim <= 64 && value_dim <= 64 {
            // sized for the key side, whose cubes are the larger (a `∂v` plane per row tile)
            let tiles = Self {
                head_dim: head_dim as u32,
                value_dim: value_dim as u32,
                planes: 8,
                parts: 1,
                gated: false,
                keys: true,
                products: StateGradProducts::Outer,
            };
            if tiles.shared_bytes() <= max {
                return Some(Self {
                    keys: false,
                    ..tiles
                });
            }
        }
        let products = if manual {
            StateGradProducts::Registers
        } else {
            StateGradProducts::Staged
        };
        // two cubes per multiprocessor where 8 planes allow it, else 4-plane cubes
        [(8u32, max / 2), (4, max)]
            .into_iter()
            .map(|(planes, cap)| {
                let tiles = Self {
                    head_dim: head_dim as u32,
                    value_dim: value_dim as u32,
                    planes,
                    parts: 1,
                    gated: false,
                    keys: false,
                    products,
                };
                (tiles, cap)
            })
            .find(|(tiles, cap)| tiles.shared_bytes() <= *cap)
            .map(|(tiles, _)| tiles)
    }

    /// Planes per cube: one per row tile (staged); for the outer products one per row tile,
    /// column part and product (`∂x`, and `∂v` for keys).
    pub fn cube_planes(&self) -> u32 {
        match self.products {
            StateGradProducts::Staged | StateGradProducts::Registers => self.planes,
            StateGradProducts::Outer => self.planes * self.parts * if self.keys { 2 } else { 1 },
        }
    }

    /// Shared memory of one cube, in bytes.
    pub fn shared_bytes(&self) -> usize {
        use crate::block_mma::A_STRIDE;
        let (d, e) = (self.head_dim as usize, self.value_dim as usize);
        let rows = 16 * self.planes as usize;
        let units = 32 * self.cube_planes() as usize;
        match self.products {
            StateGradProducts::Staged | StateGradProducts::Registers => {
                let staged = if self.products == StateGradProducts::Staged {
                    4 * rows * 32 + 2 * rows * A_STRIDE
                } else {
                    0
                };
                4 * rows
                    + 2 * rows * (d + 2)
                    + 2 * rows * (e + 8)
                    + 4 * 3 * rows
                    + 4 * units
                    + 4 * rows * (d + 1)
                    + 2 * 2 * 32 * (e + 8)
                    + 4 * 2 * 32
                    + staged
            }
            StateGradProducts::Outer => {
                4 * rows
                    + 2 * rows * (d + 8)
                    + 4 * 3 * rows
                    + 4 * units
                    + 4 * rows * self.parts as usize
                    + crate::chunk_grad_state_outer::STAGES
                        * 2
                        * crate::chunk_grad_state_outer::SLICES
                        * d
                        * (d.max(e) + 8)
                    + 8 * crate::chunk_grad_state_outer::STAGES
            }
        }
    }
}

/// Tiles of the tensor-core intra-chunk backward kernels
/// ([`chunk_grad_intra_mma`](crate::chunk_grad_intra_mma)): a cube of 8 planes owns 128 rows
/// (queries or keys) and walks the other side 64 rows at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IntraGradTiles {
    /// `d` (a multiple of 16, at most 128).
    pub head_dim: u32,
    /// `e` (a multiple of 32, at most 128).
    pub value_dim: u32,
    /// `p`.
    pub degree: u32,
    /// Whether log-gates are given (set at launch from the arguments).
    pub gated: bool,
    /// Whether the kernels run on CUDA's manually managed `mma` (`chunk_grad_intra_manual`:
    /// pairs in registers) rather than `cmma`.
    pub manual: bool,
}

impl IntraGradTiles {
    /// Tiles on `client` for inputs of `dtype`: `None` unless the tensor cores take `dtype`
    /// and bf16 operands, `d % 16 == 0`, `e % 32 == 0`, both at most 128, and both kernels fit
    /// in shared memory.
    pub fn plan<R: Runtime>(
        client: &ComputeClient<R>,
        dtype: StorageType,
        strategy: Strategy,
        head_dim: usize,
        value_dim: usize,
        degree: usize,
    ) -> Option<Self> {
        let bf16 = half::bf16::as_type_native_unchecked().storage_type();
        if !use_mma(client, strategy, dtype, &[bf16], head_dim, value_dim)
            || head_dim > 128
            || value_dim > 128
        {
            return None;
        }
        let max = shared_memory_max(client);
        let manual = manual_mma_allowed(client, strategy)
            && crate::chunk_grad_intra_manual::shared_bytes(head_dim, value_dim) <= max;
        (manual || crate::chunk_grad_intra_mma::shared_bytes(head_dim, value_dim) <= max).then_some(
            Self {
                head_dim: head_dim as u32,
                value_dim: value_dim as u32,
                degree: degree as u32,
                gated: false,
                manual,
            },
        )
    }
}

/// Tiles of the backward row kernels ([`chunk_grad`](crate::chunk_grad)): one cube owns
/// `block_rows` queries (or keys) and walks the other side's rows, and the state's features,
/// `block_inner` at a time. FMA only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GradTiles {
    /// Rows per cube.
    pub block_rows: u32,
    /// The other side's rows (and the state's features) per inner block.
    pub block_inner: u32,
    /// Units per cube; `threads / block_rows` units share a row.
    pub threads: u32,
    /// `d`.
    pub head_dim: u32,
    /// `e`.
    pub value_dim: u32,
    /// `p`.
    pub degree: u32,
    /// Whether log-gates are given (set at launch from the arguments).
    pub gated: bool,
    /// Whether a state path exists (chunked form) or not (attention form); set at launch.
    pub with_state: bool,
    /// Whether this launch adds the intra-chunk part (the first of a call's launches); set at
    /// launch.
    pub intra: bool,
    /// Whether this launch adds to the outputs of an earlier one; set at launch.
    pub accumulate: bool,
}

impl GradTiles {
    /// The largest tiles whose shared memory fits the device's FMA budget; `None` when none fit.
    pub fn plan<R: Runtime>(
        client: &ComputeClient<R>,
        head_dim: usize,
        value_dim: usize,
        degree: usize,
    ) -> Option<Self> {
        let budget = shared_memory_budget(shared_memory_max(client));
        // at most `inner` units per row, so every unit has a share of each inner block
        let threads = |rows: usize, inner: usize| (rows * inner).min(256);
        [(64, 32), (32, 32), (32, 16), (16, 16), (16, 8), (8, 8)]
            .into_iter()
            .find(|&(rows, inner)| {
                Self::shared_bytes(rows, inner, head_dim, value_dim, threads(rows, inner)) <= budget
            })
            .map(|(rows, inner)| Self {
                block_rows: rows as u32,
                block_inner: inner as u32,
                threads: threads(rows, inner) as u32,
                head_dim: head_dim as u32,
                value_dim: value_dim as u32,
                degree: degree as u32,
                gated: false,
                with_state: false,
                intra: true,
                accumulate: false,
            })
    }

    /// Shared memory of one cube, in bytes.
    pub fn shared_bytes(rows: usize, inner: usize, d: usize, e: usize, threads: usize) -> usize {
        let own = rows * (d + 1) + rows * e + rows * d + 3 * rows;
        let other = inner * (d + 1) + inner * (e + 1) + 5 * inner;
        4 * (own + other + 2 * rows * inner + threads)
    }
}

/// Tiles of the chunk-state kernel (`ΔS = φ_K(K̃)ᵀ V`, `Δz = Σ φ_K(k̃)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateTiles {
    /// Features per cube.
    pub block_f: u32,
    /// Tokens per inner block.
    pub block_k: u32,
    /// Units per cube; `threads / block_f` units share a feature row.
    pub threads: u32,
    /// `d`.
    pub head_dim: u32,
    /// `e`.
    pub value_dim: u32,
    /// Whether log-gates are given (set at launch from the arguments).
    pub gated: bool,
    /// Whether the tensor-core variant runs.
    pub mma: bool,
    /// Whether the tensor-core variant runs on CUDA's manually managed `mma`
    /// (`chunk_state_outer`) rather than `cmma`.
    pub outer: bool,
}

impl StateTiles {
    /// Tiles for inputs of `dtype` on `client` (as [`OutputTiles::plan`]); `None` when none fit.
    pub fn plan<R: Runtime>(
        client: &ComputeClient<R>,
        dtype: StorageType,
        strategy: Strategy,
        head_dim: usize,
        value_dim: usize,
    ) -> Option<Self> {
        let tiles = |block_k: usize, mma: bool| Self {
            block_f: if mma {
                crate::block_mma::ROWS as u32
            } else {
                64
            },
            block_k: block_k as u32,
            threads: 256,
            head_dim: head_dim as u32,
            value_dim: value_dim as u32,
            gated: false,
            mma,
            outer: false,
        };
        let mma_bytes = crate::chunk_state_mma::shared_bytes(head_dim, value_dim);
        let f16 = half::f16::as_type_native_unchecked().storage_type();
        if use_mma(client, strategy, dtype, &[f16], head_dim, value_dim) && value_dim <= 128 {
            if manual_mma_allowed(client, strategy)
                && head_dim <= 128
                && crate::chunk_state_outer::shared_bytes(head_dim, value_dim)
                    <= shared_memory_max(client)
            {
                return Some(Self {
                    block_f: crate::chunk_state_outer::features_per_cube(value_dim) as u32,
                    outer: true,
                    ..tiles(crate::chunk_state_outer::TOK, true)
                });
            }
            if mma_bytes <= shared_memory_max(client) {
                return Some(tiles(crate::block_mma::DEPTH, true));
            }
        }
        let budget = shared_memory_budget(shared_memory_max(client));
        [64usize, 32, 16, 8]
            .into_iter()
            .find(|&bk| 4 * (bk * (head_dim + 1) + bk * value_dim + bk) <= budget)
            .map(|bk| tiles(bk, false))
    }
}

/// What a decode launch does with the state (see [`decode`](crate::decode)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeMode {
    /// Read the state and write it advanced by the window (a one-token step).
    Step,
    /// Read the state only: the output of the window's last token.
    Read,
    /// Write the state advanced by the window, no output.
    Absorb,
}

impl DecodeMode {
    /// Whether the queries read the state.
    pub fn reads(self) -> bool {
        matches!(self, Self::Step | Self::Read)
    }

    /// Whether the state is written advanced by the window.
    pub fn advances(self) -> bool {
        matches!(self, Self::Step | Self::Absorb)
    }
}

/// Tiles of the decode kernels: each lane streams 4 value columns of a state row (16-byte
/// loads and stores), `32 / lanes_per_row` rows per plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeTiles {
    /// Value columns per cube: `4 ·` lanes per row (a power of two, at most 128).
    pub block_e: u32,
    /// Planes per cube.
    pub rows: u32,
    /// `d`.
    pub head_dim: u32,
    /// `e` (a multiple of 4).
    pub value_dim: u32,
    /// Query heads per key/value head.
    pub ratio: u32,
    /// `p`.
    pub degree: u32,
    /// What the launch does.
    pub mode: DecodeMode,
    /// Window tokens the state kernel absorbs (0 unless the mode advances the state).
    pub window: u32,
    /// Whether log-gates are given (set at launch from the arguments).
    pub gated: bool,
}

impl DecodeTiles {
    /// Tiles for a decode launch of `mode` over `window` tokens on `client`; `None` when `e` is
    /// not a multiple of 4, the window is empty or longer than
    /// [`MAX_WINDOW`](crate::decode::MAX_WINDOW), or the queries and window do not fit in
    /// shared memory (run the reference instead).
    pub fn plan<R: Runtime>(
        client: &ComputeClient<R>,
        head_dim: usize,
        value_dim: usize,
        ratio: usize,
        mode: DecodeMode,
        window: usize,
    ) -> Option<Self> {
        if value_dim % 4 != 0
            || value_dim == 0
            || window == 0
            || window > crate::decode::MAX_WINDOW
            || (mode == DecodeMode::Step && window != 1)
        {
            return None;
        }
        let lanes_per_row = (value_dim / 4).next_power_of_two().min(32);
        let block_e = 4 * lanes_per_row;
        let planes = 8;
        let slots = planes * (32 / lanes_per_row);
        let absorbed = if mode.advances() { window } else { 0 };
        let read = if mode.reads() {
            ratio * head_dim + slots * ratio * (block_e + 1)
        } else {
            0
        };
        let bytes = 4 * (read + absorbed * (head_dim + value_dim) + crate::decode::MAX_WINDOW + 1);
        (bytes <= shared_memory_budget(shared_memory_max(client))).then_some(Self {
            block_e: block_e as u32,
            rows: planes as u32,
            head_dim: head_dim as u32,
            value_dim: value_dim as u32,
            ratio: ratio as u32,
            degree: 2,
            mode,
            window: absorbed as u32,
            gated: false,
        })
    }

    /// Row slots per cube (planes × rows per plane).
    pub fn slots(&self) -> u32 {
        self.rows * (128 / self.block_e)
    }
}
