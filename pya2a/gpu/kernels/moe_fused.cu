// pya2a fused MoE dispatch / combine over IPC-mapped (symmetric) memory, one node.
//
// Every rank owns three symmetric allocations (pya2a/gpu/moe_fused.py):
//   ctrl  64 KiB, zeroed at start:
//         u64 [0  + s]  CNT  : rank s wrote its per-expert counts of call `seq` here
//         u64 [16 + s]  DATA : rank s finished writing its rows of call `seq` here
//         u64 [32 + s]  READY: rank s's expert outputs of call `seq` can be read;
//                              value = 2 * seq + (1 if they lie in its x buffer)
//         u32 [64]      DONE : blocks of this rank's dispatch that finished (local)
//         (bytes 8192..10239 hold pya2a.gpu.ipc's allocation table; not used here)
//         int32 at byte 16384: cnt[s][e], rows rank s routes to global expert e
//   xbuf  expert_x rows, (expert, source, token) order, row_bytes each
//   ybuf  expert outputs in the same layout (the expert op writes here)
//
// dispatch (one launch, call number seq):
//   1. route: every block ranks the flat (token, k) entries by expert in flat order
//      (warp shuffles + per-warp histograms), block 0 over all entries, others up to the
//      end of their own range; entry i gets pos[i] = earlier entries of its expert.
//   2. block 0 writes its per-expert counts into every rank's ctrl and raises CNT.
//   3. every block with work waits for CNT from all ranks (the flags arrive in its own
//      memory), then knows the whole p x E count matrix and so where each of its
//      entries goes: row = (rows of earlier experts at the destination)
//                         + (rows from lower ranks for this expert) + pos[i].
//   4. warps store the rows straight into the destination's xbuf (16-byte vectors).
//   5. the last block to finish raises DATA at every rank and waits for DATA from all.
//   Each block also copies its entries' expert ids into idx_own for combine, so the
//   caller's topk_idx is read only by this launch.
// combine (one launch): every block raises READY at every rank, waits for READY from
//   all, then each warp reads a token's topk rows from the owners' ybuf (or xbuf),
//   sums them weighted in float32 and stores the token; with `save` it also stores each
//   entry's row as read (autograd keeps them for the router-weight gradient).
// Backward passes (autograd) reuse both kernels: the gradient of combine is a dispatch
//   of the (token, k) rows weight * grad_y (n * topk "tokens", topk = 1: the same flat
//   order, so the rows land where the forward's expert rows were); the gradient of
//   dispatch is a combine with unit weights of the owners' expert_x gradients, with the
//   forward's slots. The host keeps the alternation: a combine launch always follows a
//   dispatch launch; two dispatch launches in a row are safe (each ends with DATA from
//   every rank, so every block of the previous one finished on every rank).
// Buffer reuse needs no extra flags: dispatch k+1 on any rank waits for CNT(k+1) from
// every rank, which each rank raises only after its combine k, which waited for READY(k)
// from every rank, raised after that rank's expert op k; so no rank writes a peer's xbuf,
// ybuf or counts while that peer may still read them. The host enforces that every
// combine launch follows a dispatch launch (the backward passes below).
//
// Graph capture: with n_dev / seq_dev set, both kernels read the token count and the call
// number from device memory instead of their (frozen) arguments; dispatch's last block
// advances the call number after every block of it has read it.
//
// Entries whose expert is outside [0, E) are dropped (not sent, weight ignored).
// Blocks wait on flags that other ranks raise: every rank's grid must be resident at once
// (the host caps grids with pya2a.gpu.ipc.grid_budget: one block per SM for a GPU of its
// own, a share for ranks sharing one; docs/gpu-ipc.md "Progress"); dispatch takes any grid
// (entries per block), combine walks tokens grid-stride.
// HIP: __shfl_sync is mapped to __shfl; untested on AMD.

#if !defined(__CUDACC_RTC__) && !defined(__HIPCC_RTC__)
#include <cstdio>  // printf; NVRTC / hiprtc declare it themselves
#endif

#include "pya2a_device.cuh"

#define MOE_MAXP 8
#define MOE_MAXE 512
#define MOE_THREADS 512
#define MOE_WARPS (MOE_THREADS / 32)
#define CTRL_CNT_FLAG 0
#define CTRL_DATA_FLAG 16
#define CTRL_READY_FLAG 32
#define CTRL_DONE 64
#define CTRL_CNT_BYTES 16384

#if defined(__HIP_PLATFORM_AMD__)
#define SHFL(v, j) __shfl((v), (j), 32)
#define SHFL_UP(v, d) __shfl_up((v), (d), 32)
#else
#define SHFL(v, j) __shfl_sync(0xffffffffu, (v), (j))
#define SHFL_UP(v, d) __shfl_up_sync(0xffffffffu, (v), (d))
#endif

// Wait until *p >= s. A watchdog turns a lost flag (a rank that never made the call, a
// protocol bug) into a message and a wrong result instead of a hung GPU: after
// MOE_WATCHDOG_NS the waiter reports and gives up.
#define MOE_WATCHDOG_NS 5000000000ull
__device__ __noinline__ u64 spin_watchdog(const u64* p, u64 s, int rank, int word) {
    u64 v, t0 = 0;
    unsigned int k = 0;
    while ((v = ld_volatile(p)) < s) {
        spin_pause(20);
        if ((++k & 4095u) == 0u) {
            const u64 t = now_ns();
            if (t0 == 0) {
                t0 = t;
            } else if (t - t0 > MOE_WATCHDOG_NS) {
                printf("pya2a moe_fused: rank %d block %d: flag word %d is %llu, waited for "
                       "%llu; giving up (watchdog)\n", rank, (int)blockIdx.x,
                       word, v, s);
                break;
            }
        }
    }
    return v;
}

__device__ __forceinline__ int* counts_of(u64 ctrl) { return (int*)(ctrl + CTRL_CNT_BYTES); }

// Warp copy of n bytes (n, dst, src multiples of 16), four vectors in flight per lane.
__device__ __forceinline__ void warp_copy16(char* dst, const char* src, i64 n, int lane) {
    uint4* d = (uint4*)dst;
    const uint4* s = (const uint4*)src;
    const i64 nv = n >> 4;
    i64 i = lane;
    for (; i + 96 < nv; i += 128) {
        uint4 a = s[i], b = s[i + 32], c = s[i + 64], e = s[i + 96];
        d[i] = a; d[i + 32] = b; d[i + 64] = c; d[i + 96] = e;
    }
    for (; i < nv; i += 32) d[i] = s[i];
}

struct DispatchArgs {
    u64 x;             // (n, row_bytes) token rows, 16-byte aligned
    u64 idx;           // (n * topk) int64 experts
    u64 ctrl;          // my ctrl
    u64 slot;          // out: int32 (n * topk): row of each entry at its destination
    u64 expert_counts; // out: int64 (El): rows per local expert
    u64 peer_ctrl[MOE_MAXP];
    u64 peer_x[MOE_MAXP];
    u64 seq;
    i64 n, topk, E, El, row_bytes, rank, p;
    i64 epb;           // entries per block
    i64 segs;          // pieces a row is cut into (one warp each)
    i64 seg_bytes;     // bytes per piece (multiple of 16)
    u64 idx_own;       // out: int64 (n * topk) copy of idx for combine
    u64 n_dev;         // 0, or an int32 in device memory: the token count, capped at n
                       // (graph capture: n is then the worst case the grid is sized for)
    u64 seq_dev;       // 0, or a u64 in device memory: the last call number; this launch
                       // is call *seq_dev + 1 and advances it (graph capture)
};

// The token count and call number of a launch: from the arguments, or from device memory
// (graph capture: a replayed launch has frozen arguments).
__device__ __forceinline__ i64 launch_count(u64 n_dev, i64 n) {
    if (!n_dev) return n;
    const i64 v = (i64)*(const volatile int*)n_dev;
    return v < 0 ? 0 : (v > n ? n : v);
}

extern "C" __global__ void __launch_bounds__(MOE_THREADS) pya2a_moe_dispatch(const DispatchArgs a) {
    __shared__ int hist[MOE_WARPS][MOE_MAXE];
    __shared__ int base[MOE_MAXE];
    __shared__ int pre[MOE_MAXE];     // exclusive prefix of totals over global experts
    __shared__ int before[MOE_MAXE];  // rows from lower ranks, per expert
    __shared__ int wsum[MOE_WARPS];
    __shared__ int s_last;
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int E = (int)a.E, El = (int)a.El, p = (int)a.p, me = (int)a.rank;
    const i64 n = launch_count(a.n_dev, a.n);
    const u64 seq = a.seq_dev ? *(const volatile u64*)a.seq_dev + 1ull : a.seq;
    const i64 N = n * a.topk;
    const long long* idx = (const long long*)a.idx;
    int* slot = (int*)a.slot;
    u64* ctrl = (u64*)a.ctrl;
    const i64 lo = (i64)blockIdx.x * a.epb;
    const i64 hi = (lo + a.epb < N) ? lo + a.epb : N;
    const bool work = (blockIdx.x == 0) || (lo < hi);

    if (work) {
        // ---- 1. route: pos of own entries (into slot), block 0 also the totals
        const i64 scan_end = (blockIdx.x == 0) ? N : hi;
        for (int e = tid; e < E; e += MOE_THREADS) base[e] = 0;
        __syncthreads();
        for (i64 c0 = 0; c0 < scan_end; c0 += MOE_THREADS) {
            for (int j = tid; j < MOE_WARPS * E; j += MOE_THREADS) hist[j / E][j % E] = 0;
            __syncthreads();
            const i64 i = c0 + tid;
            int e = -1;
            if (i < scan_end) {
                const long long v = idx[i];
                e = (v >= 0 && v < E) ? (int)v : -1;
            }
            int rank_in_warp = 0, cnt = 0;
            bool leader = true;
            for (int j = 0; j < 32; ++j) {
                const int ej = SHFL(e, j);
                if (ej == e) {
                    if (j < lane) { ++rank_in_warp; leader = false; }
                    ++cnt;
                }
            }
            if (e >= 0 && leader) hist[w][e] = cnt;
            __syncthreads();
            for (int ex = tid; ex < E; ex += MOE_THREADS) {
                int run = base[ex];
                for (int ww = 0; ww < MOE_WARPS; ++ww) {
                    const int t = hist[ww][ex];
                    hist[ww][ex] = run;
                    run += t;
                }
                base[ex] = run;
            }
            __syncthreads();
            if (i >= lo && i < hi) slot[i] = (e >= 0) ? hist[w][e] + rank_in_warp : -1;
            __syncthreads();
        }
        // ---- 2. block 0 publishes this rank's counts to every rank
        if (blockIdx.x == 0) {
            for (int j = tid; j < p * E; j += MOE_THREADS) {
                const int r = j / E, e = j % E;
                counts_of(a.peer_ctrl[r])[me * E + e] = base[e];
            }
            __threadfence_system();
            __syncthreads();
            if (tid < p) st_release_sys((u64*)a.peer_ctrl[tid] + CTRL_CNT_FLAG + me, seq);
        }
        // ---- 3. wait for every rank's counts; offsets
        if (tid < p) {
            spin_watchdog(ctrl + CTRL_CNT_FLAG + tid, seq, me, CTRL_CNT_FLAG + tid);
            __threadfence_system();
        }
        __syncthreads();
        const volatile int* cnt = counts_of(a.ctrl);
        for (int e = tid; e < E; e += MOE_THREADS) {
            int t = 0, bf = 0;
            for (int s = 0; s < p; ++s) {
                const int c = cnt[s * E + e];
                if (s < me) bf += c;
                t += c;
            }
            pre[e] = t;  // totals for now; scanned below
            before[e] = bf;
        }
        __syncthreads();
        {   // block-wide exclusive scan of pre[0..E), E <= MOE_THREADS
            const int v0 = (tid < E) ? pre[tid] : 0;
            int v = v0;
            for (int d = 1; d < 32; d <<= 1) {
                const int u = SHFL_UP(v, d);
                if (lane >= d) v += u;
            }
            if (lane == 31) wsum[w] = v;
            __syncthreads();
            if (w == 0) {
                int s = (lane < MOE_WARPS) ? wsum[lane] : 0;
                for (int d = 1; d < 32; d <<= 1) {
                    const int u = SHFL_UP(s, d);
                    if (lane >= d) s += u;
                }
                if (lane < MOE_WARPS) wsum[lane] = s;
            }
            __syncthreads();
            const int incl = v + (w > 0 ? wsum[w - 1] : 0);
            if (tid < E) pre[tid] = incl - v0;
            __syncthreads();
        }
        if (blockIdx.x == 0) {
            i64* ec = (i64*)a.expert_counts;
            for (int l = tid; l < El; l += MOE_THREADS) {
                int tot = 0;
                for (int s = 0; s < p; ++s) tot += cnt[s * E + me * El + l];
                ec[l] = tot;
            }
        }
        // final destination row of each own entry
        for (i64 i = lo + tid; i < hi; i += MOE_THREADS) {
            ((long long*)a.idx_own)[i] = idx[i];
            const int ps = slot[i];
            if (ps >= 0) {
                const int e = (int)idx[i];
                const int r = e / El;
                slot[i] = pre[e] - pre[r * El] + before[e] + ps;
            }
        }
        __syncthreads();
        // ---- 4. rows into the destinations' xbuf, one warp per (entry, piece)
        const i64 items = (hi - lo) * a.segs;
        for (i64 it = w; it < items; it += MOE_WARPS) {
            const i64 i = lo + it / a.segs;
            const i64 sg = it % a.segs;
            const int row = slot[i];
            if (row < 0) continue;
            const int e = (int)idx[i];
            const int r = e / El;
            const i64 t = i / a.topk;
            const i64 b = sg * a.seg_bytes;
            if (b >= a.row_bytes) continue;
            const i64 len = (b + a.seg_bytes <= a.row_bytes) ? a.seg_bytes : a.row_bytes - b;
            warp_copy16((char*)a.peer_x[r] + (i64)row * a.row_bytes + b,
                        (const char*)a.x + t * a.row_bytes + b, len, lane);
        }
        __threadfence_system();
    }
    // ---- 5. the last block signals completion everywhere and waits for everyone's
    __syncthreads();
    if (tid == 0) {
        unsigned int* done = (unsigned int*)(ctrl + CTRL_DONE);
        const unsigned int old = atomicAdd(done, 1u);
        s_last = (old == gridDim.x - 1);
        if (s_last) {  // every block has read *seq_dev by now (at its start)
            *(volatile unsigned int*)done = 0u;
            if (a.seq_dev) *(volatile u64*)a.seq_dev = seq;
            __threadfence_system();
        }
    }
    __syncthreads();
    if (s_last && tid < p) {
        __threadfence_system();
        st_release_sys((u64*)a.peer_ctrl[tid] + CTRL_DATA_FLAG + me, seq);
        spin_watchdog(ctrl + CTRL_DATA_FLAG + tid, seq, me, CTRL_DATA_FLAG + tid);
        __threadfence_system();
    }
}

// ---------------------------------------------------------------------------
// combine

struct F16 {
    typedef unsigned short S;
    static __device__ __forceinline__ float load(S h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ S store(float f) {
        S h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};

struct BF16 {
    typedef unsigned short S;
    static __device__ __forceinline__ float load(S h) {
        return __uint_as_float(((unsigned int)h) << 16);
    }
    static __device__ __forceinline__ S store(float f) {
        unsigned int u = __float_as_uint(f);  // round to nearest even (NaN kept quiet)
        if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return (S)((u >> 16) | 0x40u);
        u += 0x7fffu + ((u >> 16) & 1u);
        return (S)(u >> 16);
    }
};

struct F32 {
    typedef float S;
    static __device__ __forceinline__ float load(S v) { return v; }
    static __device__ __forceinline__ S store(float f) { return f; }
};

struct CombineArgs {
    u64 y;             // out: (n, hidden)
    u64 w;             // (n, topk) float32
    u64 idx;           // (n * topk) int64
    u64 slot;          // (n * topk) int32 from dispatch
    u64 ctrl;
    u64 peer_ctrl[MOE_MAXP];
    u64 peer_x[MOE_MAXP];
    u64 peer_y[MOE_MAXP];
    u64 seq;
    i64 n, topk, E, El, row_bytes, rank, p;
    i64 use_x;         // 1: my expert outputs are in my xbuf (in-place expert op)
    i64 segs;          // pieces per token row (one warp each)
    i64 seg_vecs;      // 16-byte vectors per piece
    u64 save;          // 0, or out: (n * topk, row_bytes): each entry's expert row as read
                       // (zeros for dropped entries), for the router-weight gradient
    u64 n_dev;         // as in DispatchArgs (the call number is *seq_dev, not advanced)
    u64 seq_dev;
};

#define MOE_KCHUNK 8

template <class T>
__global__ void __launch_bounds__(MOE_THREADS) pya2a_moe_combine(const CombineArgs a) {
    typedef typename T::S S;
    const int VEC = 16 / (int)sizeof(S);
    __shared__ u64 src_base[MOE_MAXP];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int p = (int)a.p, me = (int)a.rank;
    u64* ctrl = (u64*)a.ctrl;
    const i64 n = launch_count(a.n_dev, a.n);
    const u64 seq = a.seq_dev ? *(const volatile u64*)a.seq_dev : a.seq;
    if (tid < p) {
        st_release_sys((u64*)a.peer_ctrl[tid] + CTRL_READY_FLAG + me, 2ull * seq + (u64)a.use_x);
        const u64 v = spin_watchdog(ctrl + CTRL_READY_FLAG + tid, 2ull * seq, me,
                                    CTRL_READY_FLAG + tid);
        __threadfence_system();
        src_base[tid] = (v & 1ull) ? a.peer_x[tid] : a.peer_y[tid];
    }
    __syncthreads();
    const long long* idx = (const long long*)a.idx;
    const int* slot = (const int*)a.slot;
    const float* wt = (const float*)a.w;
    const i64 nvec_row = a.row_bytes >> 4;
    const i64 items = n * a.segs;
    const int topk = (int)a.topk;
    for (i64 it = (i64)blockIdx.x * MOE_WARPS + w; it < items; it += (i64)gridDim.x * MOE_WARPS) {
        const i64 t = it / a.segs;
        const i64 v0 = (it % a.segs) * a.seg_vecs;
        const i64 v1 = (v0 + a.seg_vecs < nvec_row) ? v0 + a.seg_vecs : nvec_row;
        for (i64 v = v0 + lane; v < v1; v += 32) {
            float acc[16 / sizeof(S)];
#pragma unroll
            for (int q = 0; q < VEC; ++q) acc[q] = 0.f;
            for (int k0 = 0; k0 < topk; k0 += MOE_KCHUNK) {
                uint4 buf[MOE_KCHUNK];
                float wk[MOE_KCHUNK];
#pragma unroll
                for (int kk = 0; kk < MOE_KCHUNK; ++kk) {
                    const int k = k0 + kk;
                    wk[kk] = 0.f;
                    buf[kk] = make_uint4(0u, 0u, 0u, 0u);
                    if (k < topk) {
                        const i64 ent = t * topk + k;
                        const int row = slot[ent];
                        if (row >= 0) {
                            const int r = (int)(idx[ent] / a.El);
                            const uint4* src = (const uint4*)(src_base[r] + (u64)row * (u64)a.row_bytes);
                            buf[kk] = src[v];
                            wk[kk] = wt[ent];
                        }
                        if (a.save) ((uint4*)(a.save + (u64)ent * (u64)a.row_bytes))[v] = buf[kk];
                    }
                }
#pragma unroll
                for (int kk = 0; kk < MOE_KCHUNK; ++kk) {
                    const S* e = (const S*)&buf[kk];
#pragma unroll
                    for (int q = 0; q < VEC; ++q) acc[q] = fmaf(wk[kk], T::load(e[q]), acc[q]);
                }
            }
            uint4 out;
            S* o = (S*)&out;
#pragma unroll
            for (int q = 0; q < VEC; ++q) o[q] = T::store(acc[q]);
            ((uint4*)(a.y + (u64)t * (u64)a.row_bytes))[v] = out;
        }
    }
}

template __global__ void pya2a_moe_combine<F16>(const CombineArgs);
template __global__ void pya2a_moe_combine<BF16>(const CombineArgs);
template __global__ void pya2a_moe_combine<F32>(const CombineArgs);

// The trivial expert op used by bench/moe_dispatch_combine.py and the GPU checks: the rows of local
// expert l are scaled by (1 + (first_expert + l) % 5 / 4), the row count read from the
// device counts (no host round trip). One block per row at a time, 16-byte vectors
// (row_bytes % 16 == 0). x and y may be the same buffer.
template <class T>
__global__ void pya2a_moe_scale_experts(u64 x, u64 y, const long long* counts, int El,
                                        int first_expert, i64 row_bytes) {
    typedef typename T::S S;
    const int VEC = 16 / (int)sizeof(S);
    __shared__ long long s_off[MOE_MAXE + 1];
    if (threadIdx.x == 0) {
        long long o = 0;
        for (int l = 0; l < El; ++l) { s_off[l] = o; o += counts[l]; }
        s_off[El] = o;
    }
    __syncthreads();
    const i64 rows = s_off[El], nv = row_bytes >> 4;
    int l = 0;
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        while (l + 1 < El && s_off[l + 1] <= row) ++l;
        const float f = 1.f + (float)((first_expert + l) % 5) / 4.f;
        const uint4* src = (const uint4*)(x + (u64)row * (u64)row_bytes);
        uint4* dst = (uint4*)(y + (u64)row * (u64)row_bytes);
        for (i64 v = threadIdx.x; v < nv; v += blockDim.x) {
            uint4 u = src[v];
            S* e = (S*)&u;
#pragma unroll
            for (int q = 0; q < VEC; ++q) e[q] = T::store(T::load(e[q]) * f);
            dst[v] = u;
        }
    }
}

template __global__ void pya2a_moe_scale_experts<F16>(u64, u64, const long long*, int, int, i64);
template __global__ void pya2a_moe_scale_experts<BF16>(u64, u64, const long long*, int, int, i64);
template __global__ void pya2a_moe_scale_experts<F32>(u64, u64, const long long*, int, int, i64);

// ---------------------------------------------------------------------------
// per_rank mode: one copy per (token, destination rank). Dispatch is three dispatch
// launches (pya2a/gpu/moe_fused.py): the routing alone (row_bytes 0: the slots and
// counts, no rows), the copies (each token once per destination rank, routed to that
// rank's first expert, so they land in the destination's copy buffer in source-rank, then
// token order) and each copy's table (the expert_x rows it expands to, ascending, -1
// padded, through the same routing into the table buffer); then expand, below, on the
// receiver. Combine is a dispatch launch of the weights (16 bytes per entry, landing at
// the entry's expert_x row), partials, below, on the owner, and a combine launch with
// unit weights that pulls one partial per (token, rank) from the owners.

// x[table[c][j]] = copies[c] for every received copy c < *ncopies and table entry j.
extern "C" __global__ void pya2a_moe_expand(u64 x, u64 copies, u64 table, u64 ncopies, int tw,
                                            i64 row_bytes) {
    const i64 C = *(const long long*)ncopies;
    const int* tab = (const int*)table;
    const i64 nv = row_bytes >> 4;
    for (i64 it = blockIdx.x; it < C * tw; it += gridDim.x) {
        const int row = tab[it];
        if (row < 0) continue;
        const uint4* src = (const uint4*)(copies + (u64)(it / tw) * (u64)row_bytes);
        uint4* dst = (uint4*)(x + (u64)row * (u64)row_bytes);
        for (i64 v = threadIdx.x; v < nv; v += blockDim.x) dst[v] = src[v];
    }
}

// out[c] = sum over the table rows r of copy c, ascending (expert order, then k), of
// w[r] * y[r] in float32 (FMA), cast to the row type; w[r] is the first float of the
// 16-byte weight row r.
template <class T>
__global__ void pya2a_moe_partials(u64 out, u64 y, u64 wrows, u64 table, u64 ncopies, int tw,
                                   i64 row_bytes) {
    typedef typename T::S S;
    const int VEC = 16 / (int)sizeof(S);
    const i64 C = *(const long long*)ncopies;
    const int* tab = (const int*)table;
    const float* wr = (const float*)wrows;
    const i64 nv = row_bytes >> 4;
    for (i64 c = blockIdx.x; c < C; c += gridDim.x) {
        for (i64 v = threadIdx.x; v < nv; v += blockDim.x) {
            float acc[16 / sizeof(S)];
#pragma unroll
            for (int q = 0; q < VEC; ++q) acc[q] = 0.f;
            for (int j = 0; j < tw; ++j) {
                const int row = tab[c * tw + j];
                if (row < 0) continue;
                const float wk = wr[(i64)row * 4];
                const uint4 u = ((const uint4*)(y + (u64)row * (u64)row_bytes))[v];
                const S* e = (const S*)&u;
#pragma unroll
                for (int q = 0; q < VEC; ++q) acc[q] = fmaf(wk, T::load(e[q]), acc[q]);
            }
            uint4 o;
            S* os = (S*)&o;
#pragma unroll
            for (int q = 0; q < VEC; ++q) os[q] = T::store(acc[q]);
            ((uint4*)(out + (u64)c * (u64)row_bytes))[v] = o;
        }
    }
}

template __global__ void pya2a_moe_partials<F16>(u64, u64, u64, u64, u64, int, i64);
template __global__ void pya2a_moe_partials<BF16>(u64, u64, u64, u64, u64, int, i64);
template __global__ void pya2a_moe_partials<F32>(u64, u64, u64, u64, u64, int, i64);
