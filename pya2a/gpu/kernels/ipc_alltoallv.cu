// pya2a IPC all-to-all kernel: one launch moves every peer block, signalling with
// sequence-numbered flags in peer-mapped memory (no host barrier, graph capturable).
//
// Layout of the control block at the start of every rank's symmetric heap
// (must match pya2a/gpu/ipc.py: CTRL_* constants):
//   [0]      u64 seq         number of the latest call (device-side, so graphs replay);
//                            published once every block of that call has read it
//   [8]      u32 done        blocks of the current call that have read seq (reset by the last)
//   [16]     u64 cur         call number in flight (copy-engine path)
//   [128]    u64 rdy_seq[P]  written by peer r: "call s, here is my key for you"
//   [256]    u64 rdy_key[P]  key = (allocation index << 56) | byte offset in it
//   [384]    u64 fin[P]      written by peer r: r finished call fin[r] (posted at the
//                            start of r's next call; the LL method waits on it)
//   [512]    u32 cnt[P]      local: blocks done with a peer in this call (LL)
//   [1024]   u64 flag[P][B]  written by peer r: chunk c of call s is done
//   [8192]   u64 tab[S][P]   local: base address of allocation k on rank r (my VA)
//
// Protocol, push (mode 0), rank me, call s:
//   receiver role: tell each sender where to write (my recv buffer if it is
//     symmetric, else my staging slot for that sender), then wait flag[src][c] >= s
//     and copy the staging slot out if staged.
//   sender role: wait rdy_seq[dst] >= s, store chunk c into dst's memory, fence
//     (system scope), then set flag[me][c] = s in dst's control block.
// Protocol, pull (mode 1): the send buffer must be symmetric; the sender publishes
//   its key, the receiver reads from the peer and then sets flag[me][c] = s in
//   the sender's control block ("consumed"); the sender waits for that before the
//   call completes, so the send buffer may be reused after the call.
// A flag can never run ahead of the waiter (each side needs the other's previous
// call to finish first), so "wait until >= s" is exact.
//
// Every block spins on flags written by other ranks: every rank's grid must be resident
// at once (the host sizes grids for that, docs/gpu-ipc.md "Progress"); a grid smaller
// than the number of roles walks them (role_of, FOR_ROLES).
//
// Portability: only __threadfence_system, volatile loads/stores and atomicAdd; the
// CUDA-only instructions are guarded (pya2a_device.cuh) so hiprtc can build the file.
// Untested on AMD.

#include "pya2a_device.cuh"

#define PYA2A_MAXP 8
#define PYA2A_MAXB 64
#define PYA2A_MAXS 32

#define CTRL_SEQ 0
#define CTRL_DONE 1
#define CTRL_CUR 2
#define CTRL_RDY_SEQ 16
#define CTRL_RDY_KEY 32
#define CTRL_FIN 48
#define CTRL_FLAG 128
#define CTRL_TAB 1024
#define KEY_SHIFT 56
#define KEY_MASK ((1ull << KEY_SHIFT) - 1ull)
#define KEY_REGISTERED 255ull    // key index: base from Args.reg_base (registered user buffer)

struct Args {
    u64 sendbuf;
    u64 recvbuf;
    u64 ctrl;                    // my control block (= my heap base)
    u64 peer_ctrl[PYA2A_MAXP];   // peers' control blocks in my address space
    u64 my_key;                  // key of recvbuf (push) / sendbuf (pull); ~0 = staged
    u64 stage_off;               // byte offset of staging slots in the heap
    i64 slot_bytes;              // bytes per staging slot
    i64 scount[PYA2A_MAXP];
    i64 sdispl[PYA2A_MAXP];
    i64 rcount[PYA2A_MAXP];
    i64 rdispl[PYA2A_MAXP];
    i64 rank;
    i64 p;
    i64 bpp;                     // blocks per peer in this launch (grid = p * bpp)
    i64 min_chunk;               // bytes; chunks per pair = clamp(ceil(n / min_chunk), 1, max_chunks)
    i64 max_chunks;              // same on every rank
    i64 mode;                    // 0 push, 1 pull
    u64 ll_off;                  // byte offset of the LL buffers in the heap
    i64 ll_slot;                 // bytes per LL buffer (one parity, one sender)
    i64 self_blocks;             // blocks doing the local (own) block copy
    i64 ce_sub;                  // copy-engine path: copies (and flags) per staged block
    u64 reg_base[PYA2A_MAXP];    // registered receive buffers: allocation base of rank r here
};

// Number of chunks and chunk size for a pair moving n bytes: a function of n and
// launch-independent constants only, so sender and receiver agree.
__device__ __forceinline__ void chunking(i64 n, const Args& a, i64* nch, i64* cs) {
    i64 k = (n + a.min_chunk - 1) / a.min_chunk;
    if (k < 1) k = 1;
    if (k > a.max_chunks) k = a.max_chunks;
    i64 c = (n + k - 1) / k;
    c = (c + 255) & ~(i64)255;   // keep chunk starts 256-byte aligned
    *nch = k;
    *cs = c;
}

__device__ __forceinline__ char* key_addr(const Args& a, u64 key, int peer) {
    const u64* tab = (const u64*)a.ctrl + CTRL_TAB;
    const u64 k = key >> KEY_SHIFT;
    const u64 base = (k == KEY_REGISTERED) ? a.reg_base[peer] : tab[k * PYA2A_MAXP + peer];
    return (char*)(base + (key & KEY_MASK));
}

// Roles: [0, self_blocks) copy this rank's own block; the rest are (peer q, chunk c)
// pairs, q = 1..p-1: role (q, c) sends chunk c to rank me+q and receives chunk c from
// rank me-q, and rank me+q's role (q, c) is its partner.
//
// A launch may have fewer blocks than roles (ranks sharing one GPU get a share of its
// SMs each, docs/gpu-ipc.md): block b takes roles b, b + gridDim.x, ... and walks them
// phase by phase (announce, send, own copy, receive). A phase waits only for an earlier
// phase of the peers, and every block finishes a phase for all its roles before it waits
// in the next one, so the exchange completes with any grid of at least one block per rank,
// provided every rank's grid is resident at once.
__device__ __forceinline__ int num_roles(const Args& a) {
    return (int)a.self_blocks + ((int)a.p - 1) * (int)a.bpp;
}

__device__ __forceinline__ void role_of(const Args& a, int r, int* q, int* c) {
    if (r < (int)a.self_blocks) {
        *q = 0;
        *c = r;
    } else {
        const int i = r - (int)a.self_blocks;
        *q = 1 + i / (int)a.bpp;
        *c = i % (int)a.bpp;
    }
}

#define FOR_ROLES(a, r) for (int r = (int)blockIdx.x; r < num_roles(a); r += (int)gridDim.x)

__device__ void self_copy(const Args& a, int c) {
    const i64 n = a.scount[a.rank];
    const i64 cs = (((n + a.self_blocks - 1) / a.self_blocks) + 255) & ~(i64)255;
    const i64 b = c * cs, e = (b + cs < n) ? b + cs : n;
    if (b < e)
        block_copy((char*)a.recvbuf + a.rdispl[a.rank] + b,
                   (const char*)a.sendbuf + a.sdispl[a.rank] + b, e - b);
}

// This call's number s = (last call number) + 1. Every thread of the block reads it; then
// thread 0 counts the block in, and the last block of the grid to arrive publishes s for
// the next call (which reads it only after this grid has completed, so no fence). Counting
// at the start rather than at the end keeps the barrier and the atomic's round trip out of
// the end of the call, where they would delay the grid's completion.
__device__ __forceinline__ u64 begin_call(const Args& a) {
    u64* ctrl = (u64*)a.ctrl;
    const u64 s = ld_volatile(ctrl + CTRL_SEQ) + 1;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* done = (unsigned int*)(ctrl + CTRL_DONE);
        if (atomicAdd(done, 1u) == gridDim.x - 1) {
            *(volatile unsigned int*)done = 0u;
            *(volatile u64*)(ctrl + CTRL_SEQ) = s;
        }
    }
    return s;
}

// Tell every peer that this rank has finished call s - 1: the previous grid of this
// stream completed before this one got past pdl_enter (or started, without PDL). Posted
// at the start of call s rather than at the end of call s - 1, because a grid completes
// only once its stores are performed, and a store into peer memory at the very end
// would hold that back by an NVLink round trip.
__device__ __forceinline__ void announce_finished(const Args& a, u64 s) {
    const int r = (int)threadIdx.x;
    if (blockIdx.x == 0 && r < (int)a.p && r != (int)a.rank)
        *(volatile u64*)((u64*)a.peer_ctrl[r] + CTRL_FIN + a.rank) = s - 1;
}

// The chunk that role r moves for this rank: towards rank me+q (sending, from its send
// block) or from rank me-q (receiving, into its receive block). Sets the peer, the chunk
// index and its byte range [*b, *e); false where the role moves nothing (its own block, an
// empty block, a chunk past the block's last).
__device__ __forceinline__ bool role_chunk(const Args& a, int r, bool sending, int* peer,
                                           int* c, i64* b, i64* e) {
    int q;
    i64 nch, cs;
    role_of(a, r, &q, c);
    if (q == 0) return false;
    const int me = (int)a.rank, p = (int)a.p;
    *peer = sending ? (me + q) % p : (me - q + p) % p;
    const i64 n = sending ? a.scount[*peer] : a.rcount[*peer];
    chunking(n, a, &nch, &cs);
    if (n <= 0 || *c >= nch) return false;
    *b = (i64)(*c) * cs;
    *e = (*b + cs < n) ? *b + cs : n;
    return *b < *e;
}

// The first role of each peer q != 0 that has a block to exchange with it: the peer
// (me+q when sending, me-q when receiving), or -1.
__device__ __forceinline__ int role_first(const Args& a, int r, bool sending) {
    int q, c;
    role_of(a, r, &q, &c);
    if (q == 0 || c != 0) return -1;
    const int me = (int)a.rank, p = (int)a.p;
    const int peer = sending ? (me + q) % p : (me - q + p) % p;
    return (sending ? a.scount[peer] : a.rcount[peer]) > 0 ? peer : -1;
}

__device__ __forceinline__ void own_block(const Args& a) {
    int q, c;
    FOR_ROLES(a, r) {
        role_of(a, r, &q, &c);
        if (q == 0) self_copy(a, c);
    }
}

extern "C" __global__ void __launch_bounds__(512) pya2a_ipc_alltoallv(const Args a) {
    __shared__ u64 s_key;
    pdl_enter();
    u64* ctrl = (u64*)a.ctrl;
    const int me = (int)a.rank;
    int peer, c;
    i64 b, e;
    const u64 s = begin_call(a);
    announce_finished(a, s);

    if (a.mode == 0) {
        // --- push ---
        const bool staged = (a.my_key == ~0ull);
        FOR_ROLES(a, r) {  // receiver: tell each sender where to write
            const int src = role_first(a, r, false);
            if (src >= 0 && threadIdx.x == 0) {
                const u64 key = staged ? (a.stage_off + (u64)src * (u64)a.slot_bytes) : (a.my_key + (u64)a.rdispl[src]);
                u64* pc = (u64*)a.peer_ctrl[src];
                *(volatile u64*)(pc + CTRL_RDY_KEY + me) = key;
                st_release_sys(pc + CTRL_RDY_SEQ + me, s);
            }
        }
        FOR_ROLES(a, r) {  // sender: store the chunk, then raise its flag
            if (!role_chunk(a, r, true, &peer, &c, &b, &e)) continue;
            if (threadIdx.x == 0) {
                spin_until_ge(ctrl + CTRL_RDY_SEQ + peer, s);
                __threadfence_system();
                s_key = ld_volatile(ctrl + CTRL_RDY_KEY + peer);
            }
            __syncthreads();
            char* out = key_addr(a, s_key, peer);
            block_copy(out + b, (const char*)a.sendbuf + a.sdispl[peer] + b, e - b);
            __threadfence_system();
            __syncthreads();
            if (threadIdx.x == 0)
                st_release_sys((u64*)a.peer_ctrl[peer] + CTRL_FLAG + me * PYA2A_MAXB + c, s);
        }
        own_block(a);
        FOR_ROLES(a, r) {  // receiver: wait for the chunk, copy it out if staged
            if (!role_chunk(a, r, false, &peer, &c, &b, &e)) continue;
            if (threadIdx.x == 0) {
                spin_until_ge(ctrl + CTRL_FLAG + peer * PYA2A_MAXB + c, s);
                __threadfence_system();
            }
            __syncthreads();
            if (staged)
                block_copy((char*)a.recvbuf + a.rdispl[peer] + b,
                           (const char*)a.ctrl + a.stage_off + (u64)peer * (u64)a.slot_bytes + b, e - b);
        }
    } else {
        // --- pull: sendbuf symmetric (my_key is its key) ---
        FOR_ROLES(a, r) {  // sender: publish where to read
            const int dst = role_first(a, r, true);
            if (dst >= 0 && threadIdx.x == 0) {
                u64* pc = (u64*)a.peer_ctrl[dst];
                *(volatile u64*)(pc + CTRL_RDY_KEY + me) = a.my_key + (u64)a.sdispl[dst];
                st_release_sys(pc + CTRL_RDY_SEQ + me, s);
            }
        }
        FOR_ROLES(a, r) {  // receiver: read the chunk, then tell the sender "consumed"
            if (!role_chunk(a, r, false, &peer, &c, &b, &e)) continue;
            if (threadIdx.x == 0) {
                spin_until_ge(ctrl + CTRL_RDY_SEQ + peer, s);
                __threadfence_system();
                s_key = ld_volatile(ctrl + CTRL_RDY_KEY + peer);
            }
            __syncthreads();
            const char* in = key_addr(a, s_key, peer);
            block_copy((char*)a.recvbuf + a.rdispl[peer] + b, in + b, e - b);
            __threadfence_system();
            __syncthreads();
            if (threadIdx.x == 0)
                st_release_sys((u64*)a.peer_ctrl[peer] + CTRL_FLAG + me * PYA2A_MAXB + c, s);
        }
        own_block(a);
        FOR_ROLES(a, r) {  // sender: the send buffer may be reused once every chunk is read
            if (role_chunk(a, r, true, &peer, &c, &b, &e) && threadIdx.x == 0)
                spin_until_ge(ctrl + CTRL_FLAG + peer * PYA2A_MAXB + c, s);
        }
    }
}

// ---------------------------------------------------------------------------
// LL ("low latency") method for small blocks: 16-byte lines {d0, tag, d1, tag}
// carry 8 payload bytes and the 32-bit call number twice (as NCCL's LL lines), written
// with one 16-byte volatile store, so the receiver polls the data itself: no fence, no
// separate flag, one NVLink crossing, and half the memory instructions of 8-byte lines.
// The receiver takes a line once both tags match (each 8-byte half lands atomically).
// Buffers are double-buffered by call parity in the receiver's heap; a sender reuses a
// buffer only once the receiver has published fin >= s - 2 (it finished the call that
// last used it). Tags start at 1 and the buffers are zeroed once, so no stale match.

__device__ __forceinline__ void ll_chunking(i64 lines, const Args& a, i64* nch, i64* cs) {
    chunking(lines * 8, a, nch, cs);
    i64 c = (lines + *nch - 1) / *nch;
    *cs = (c + 15) & ~(i64)15;
}

__device__ __forceinline__ int ll_align(const void* p) {
    const u64 x = (u64)p;
    return (x & 7ull) == 0 ? 8 : ((x & 3ull) == 0 ? 4 : 0);
}

// 8 payload bytes of line i from a block of n bytes (zero past the end)
__device__ __forceinline__ uint2 ll_load8(const char* in, i64 i, i64 n, int al) {
    const i64 off = 8 * i;
    uint2 v = make_uint2(0u, 0u);
    if (off + 8 <= n) {
        if (al == 8) return *(const uint2*)(in + off);
        if (al == 4) {
            v.x = ((const unsigned int*)(in + off))[0];
            v.y = ((const unsigned int*)(in + off))[1];
            return v;
        }
    }
    for (int k = 0; k < 8; ++k) {
        if (off + k < n) {
            const unsigned int b = (unsigned int)(unsigned char)in[off + k];
            if (k < 4) v.x |= b << (8 * k);
            else v.y |= b << (8 * (k - 4));
        }
    }
    return v;
}

__device__ __forceinline__ void ll_store8(char* o, i64 i, uint4 w, i64 n, int al) {
    const i64 off = 8 * i;
    if (off + 8 <= n) {
        if (al == 8) {
            *(uint2*)(o + off) = make_uint2(w.x, w.z);
            return;
        }
        if (al == 4) {
            ((unsigned int*)(o + off))[0] = w.x;
            ((unsigned int*)(o + off))[1] = w.z;
            return;
        }
    }
    for (int k = 0; k < 8; ++k)
        if (off + k < n) o[off + k] = (char)(((k < 4 ? w.x : w.z) >> (8 * (k & 3))) & 0xffu);
}

__device__ __forceinline__ void ll_put(uint4* p, uint2 v, unsigned int tag) {
#if defined(__CUDA_ARCH__) && !defined(__HIP_PLATFORM_AMD__)
    asm volatile("st.volatile.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 ::"l"(p), "r"(v.x), "r"(tag), "r"(v.y), "r"(tag) : "memory");
#else
    volatile u64* q = (volatile u64*)p;
    q[0] = ((u64)tag << 32) | (u64)v.x;
    q[1] = ((u64)tag << 32) | (u64)v.y;
#endif
}

__device__ __forceinline__ uint4 ll_get(const uint4* p) {
    uint4 v;
#if defined(__CUDA_ARCH__) && !defined(__HIP_PLATFORM_AMD__)
    asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
#else
    const volatile u64* q = (const volatile u64*)p;
    const u64 a = q[0], b = q[1];
    v = make_uint4((unsigned int)a, (unsigned int)(a >> 32), (unsigned int)b, (unsigned int)(b >> 32));
#endif
    return v;
}

__device__ __forceinline__ bool ll_ready(uint4 w, unsigned int tag) {
    return w.y == tag && w.w == tag;
}

__device__ __forceinline__ uint4 ll_wait(const uint4* p, unsigned int tag) {
    uint4 w = ll_get(p);
    while (!ll_ready(w, tag)) w = ll_get(p);
    return w;
}

// Lines [sb, se) of chunk c of a block of ls lines.
__device__ __forceinline__ void ll_range(const Args& a, i64 ls, int c, i64* sb, i64* se) {
    *sb = 0;
    *se = 0;
    if (ls > 0) {
        i64 nch, cs;
        ll_chunking(ls, a, &nch, &cs);
        if (c < nch) {
            *sb = (i64)c * cs;
            *se = (*sb + cs < ls) ? *sb + cs : ls;
        }
    }
}

extern "C" __global__ void __launch_bounds__(512) pya2a_ipc_ll(const Args a) {
    pdl_enter();
    u64* ctrl = (u64*)a.ctrl;
    const int me = (int)a.rank, p = (int)a.p;
    const i64 nt = blockDim.x;
    int q, c;
    // The payload of this thread's first line of the block's first role, loaded before
    // the call number and the buffer-reuse check so that its latency overlaps theirs (with
    // small chunks that is the only line a thread sends).
    role_of(a, (int)blockIdx.x, &q, &c);
    i64 sb, se;
    int dst = (me + q) % p;
    i64 ns = (q == 0) ? 0 : a.scount[dst];
    ll_range(a, (ns + 7) >> 3, c, &sb, &se);
    const char* in = (const char*)a.sendbuf + a.sdispl[dst];
    int sal = ll_align(in);
    i64 i0 = sb + threadIdx.x;
    const uint2 first = (i0 < se) ? ll_load8(in, i0, ns, sal) : make_uint2(0u, 0u);
    // dst's "finished" flag, read together with the call number rather than after it
    const u64 fin0 = (i0 < se) ? ld_volatile(ctrl + CTRL_FIN + dst) : 0ull;
    const u64 s = begin_call(a);
    announce_finished(a, s);
    const unsigned int tag = (unsigned int)s;
    const u64 par = s & 1ull;
    FOR_ROLES(a, r) {  // send: every line carries the call number
        const bool head = (r == (int)blockIdx.x);
        if (!head) {
            role_of(a, r, &q, &c);
            dst = (me + q) % p;
            ns = (q == 0) ? 0 : a.scount[dst];
            ll_range(a, (ns + 7) >> 3, c, &sb, &se);
            in = (const char*)a.sendbuf + a.sdispl[dst];
            sal = ll_align(in);
            i0 = sb + threadIdx.x;
        }
        if (q == 0 || i0 >= se) continue;
        const uint2 v = head ? first : ll_load8(in, i0, ns, sal);
        const u64 fin = head ? fin0 : ld_volatile(ctrl + CTRL_FIN + dst);
        // dst finished the call that last used this parity's buffer (every sending
        // thread reads the flag itself: one broadcast load, no block barrier)
        if (s >= 3 && fin < s - 2) spin_until_ge(ctrl + CTRL_FIN + dst, s - 2);
        uint4* out = (uint4*)(a.peer_ctrl[dst] + a.ll_off + (par * (u64)p + (u64)me) * (u64)a.ll_slot);
        ll_put(out + i0, v, tag);
        i64 i = i0 + nt;
        for (; i + nt < se; i += 2 * nt) {  // two loads in flight before the stores
            const uint2 v0 = ll_load8(in, i, ns, sal), v1 = ll_load8(in, i + nt, ns, sal);
            ll_put(out + i, v0, tag);
            ll_put(out + i + nt, v1, tag);
        }
        if (i < se) ll_put(out + i, ll_load8(in, i, ns, sal), tag);
    }
    own_block(a);
    FOR_ROLES(a, r) {  // receive: poll the lines themselves
        role_of(a, r, &q, &c);
        if (q == 0) continue;
        const int src = (me - q + p) % p;
        const i64 nr = a.rcount[src];
        i64 b, e;
        ll_range(a, (nr + 7) >> 3, c, &b, &e);
        if (b >= e) continue;
        const uint4* inl = (const uint4*)(a.ctrl + a.ll_off + (par * (u64)p + (u64)src) * (u64)a.ll_slot);
        char* o = (char*)a.recvbuf + a.rdispl[src];
        const int al = ll_align(o);
        i64 i = b + threadIdx.x;
        for (; i + 3 * nt < e; i += 4 * nt) {
            // issue four polls before waiting on any of them
            uint4 w0 = ll_get(inl + i), w1 = ll_get(inl + i + nt);
            uint4 w2 = ll_get(inl + i + 2 * nt), w3 = ll_get(inl + i + 3 * nt);
            if (!ll_ready(w0, tag)) w0 = ll_wait(inl + i, tag);
            if (!ll_ready(w1, tag)) w1 = ll_wait(inl + i + nt, tag);
            if (!ll_ready(w2, tag)) w2 = ll_wait(inl + i + 2 * nt, tag);
            if (!ll_ready(w3, tag)) w3 = ll_wait(inl + i + 3 * nt, tag);
            ll_store8(o, i, w0, nr, al);
            ll_store8(o, i + nt, w1, nr, al);
            ll_store8(o, i + 2 * nt, w2, nr, al);
            ll_store8(o, i + 3 * nt, w3, nr, al);
        }
        for (; i < e; i += nt) ll_store8(o, i, ll_wait(inl + i, tag), nr, al);
    }
}

// ---------------------------------------------------------------------------
// Copy-engine path: the data moves with cudaMemcpyAsync (into the peers' staging
// slots, or straight into their symmetric receive buffers when a plan exchanged
// the addresses), one peer after the other on one copy stream; these kernels do
// the signalling. Stream layout of one call (host side, ipc_alltoallv.py):
//   main: ce_pre -> fork -> ce_post (concurrent with the copies) -> wait join
//   copy: copy to me+1, ce_flag(1), copy to me+2, ce_flag(2), ... -> join
// so a receiver copies a staging slot out while the next peer's data arrives.
// ce_pre: publish "ready for call s" to every sender and wait for it from every
// receiver I will write to.
extern "C" __global__ void pya2a_ipc_ce_pre(const Args a) {
    u64* ctrl = (u64*)a.ctrl;
    const int me = (int)a.rank, p = (int)a.p;
    const u64 s = ld_volatile(ctrl + CTRL_SEQ) + 1;
    const int r = threadIdx.x;
    if (r == 0) *(volatile u64*)(ctrl + CTRL_CUR) = s;
    announce_finished(a, s);
    if (r < p && r != me) {
        if (a.rcount[r] > 0) {
            u64* pc = (u64*)a.peer_ctrl[r];
            *(volatile u64*)(pc + CTRL_RDY_KEY + me) = a.stage_off + (u64)r * (u64)a.slot_bytes;
            st_release_sys(pc + CTRL_RDY_SEQ + me, s);
        }
        if (a.scount[r] > 0) spin_until_ge(ctrl + CTRL_RDY_SEQ + r, s);
    }
}

// ce_flag: runs on the copy stream right after sub-copy j to rank me+q completed.
extern "C" __global__ void pya2a_ipc_ce_flag(const Args a, const i64 q, const i64 j) {
    if (threadIdx.x == 0) {
        const u64 s = ld_volatile((const u64*)a.ctrl + CTRL_CUR);
        const int me = (int)a.rank;
        const int dst = (me + (int)q) % (int)a.p;
        __threadfence_system();
        st_release_sys((u64*)a.peer_ctrl[dst] + CTRL_FLAG + me * PYA2A_MAXB + j, s);
    }
}

// ce_post: wait for every sender, copy the staging slots out into the receive
// buffer if staged, publish the call number.
extern "C" __global__ void __launch_bounds__(512) pya2a_ipc_ce_post(const Args a) {
    u64* ctrl = (u64*)a.ctrl;
    const int me = (int)a.rank, p = (int)a.p;
    int q, c;
    const u64 s = begin_call(a);
    FOR_ROLES(a, r) {
        role_of(a, r, &q, &c);
        if (q == 0) continue;
        const int src = (me - q + p) % p;
        // A staged block arrives as ce_sub sub-copies, each flagged: role c copies its
        // share of sub-copy j = c % J out as soon as that one has landed.
        const i64 nr = a.rcount[src];
        const bool staged = (a.my_key == ~0ull);
        const int J = staged ? (int)a.ce_sub : 1;
        const int j = c % J, k = c / J;
        const int nb = ((int)a.bpp - j + J - 1) / J;
        const i64 sub = ((((nr + J - 1) / J) + 255) & ~(i64)255);
        const i64 sb = (i64)j * sub, se = (sb + sub < nr) ? sb + sub : nr;
        if (sb < se) {
            if (threadIdx.x == 0) {
                spin_until_ge(ctrl + CTRL_FLAG + src * PYA2A_MAXB + j, s);
                __threadfence_system();
            }
            __syncthreads();
            if (staged) {
                const i64 piece = ((((se - sb) + nb - 1) / nb) + 255) & ~(i64)255;
                const i64 b = sb + (i64)k * piece, e = (b + piece < se) ? b + piece : se;
                if (b < e)
                    block_copy((char*)a.recvbuf + a.rdispl[src] + b,
                               (const char*)a.ctrl + a.stage_off + (u64)src * (u64)a.slot_bytes + b, e - b);
            }
        }
    }
}
