/* The expert cache's counters, as the engine reports them: the types the
 * model's stats calls fill (model/model.h) and the daemon's /metrics and
 * /v1/moed/stats read. Plain data. */
#ifndef MOE_CACHE_STATS_H
#define MOE_CACHE_STATS_H

#include <stddef.h>
#include <stdint.h>

struct moe_cache_stats {
    uint64_t hits, misses;          /* acquires that found the expert / started a load */
    uint64_t loads_ok, loads_failed, evictions;
    /* Of the failed loads, from the expert store (io/expert_src.h): blobs
     * whose checksum did not match, malformed or truncated ones, read
     * errors; and reads requeued after a transient error or a short count
     * (bounded: a storm beyond the bound fails the load). */
    uint64_t checksum_errors, format_errors, io_errors, read_retries;
    uint64_t bytes_loaded;
    double stall_s;                 /* time the engine spent waiting for loads */
    uint64_t prefetch_issued, prefetch_used, prefetch_wasted, prefetch_dropped;
    uint64_t prefetch_cancelled;    /* queued prefetches dropped as stale before they started */
    uint64_t host_hits, host_inserts;  /* host-RAM tier below the slots */
    uint64_t host_prefetches;          /* prefetches served by the host tier */
    /* Uploads into slots on the backend's copy stream (a staged cache: a
     * GPU backend, or upload_weights): how many, their bytes, the copy
     * stream's time for the timed ones (kernels/backend.h moe_copy_stats),
     * and how often the host had to wait for one (a slot reused before the
     * upload from its staging buffer had finished; never on a hit). */
    uint64_t uploads, upload_bytes, uploads_timed, upload_timed_bytes;
    double upload_s;
    uint64_t upload_host_waits;
    /* Hybrid lanes (a device backend; model/experts.c, doc/cache.md): the
     * missed experts computed on the CPU from host memory, those copied
     * into a slot and computed on the device, and those computed on the CPU
     * and copied as well (for later hits); the expert bytes each lane
     * read; the engine's time computing the CPU lane (activations moved
     * both ways included) and waiting for copied experts. Counted per
     * (layer step, expert), hits not included. */
    uint64_t lane_cpu, lane_copy, lane_both;
    uint64_t lane_cpu_bytes, lane_copy_bytes, lane_both_bytes;
    double lane_cpu_s, lane_copy_wait_s;
    /* miss_lane = auto: decode steps the governor ran in each arm (auto,
     * copy-only, cpu-only; cache/lane.h) */
    uint64_t lane_steps_auto, lane_steps_copy, lane_steps_cpu;
    /* The expert store's reader (io/expert_src.h moe_io_stats): requests
     * and bytes read, the time a request was in flight, the integrals of
     * the requests and 4 KiB pages in flight (/ io_busy_s: the depth and
     * bytes in flight achieved), the most requests in flight, the
     * configured depth and staging buffers, the time demand loads waited
     * for a staging buffer and the loads' summed latency. */
    uint64_t io_requests, io_bytes;
    double io_busy_s, io_depth_s, io_pages_s, io_stage_wait_s, io_load_s;
    unsigned io_max_depth, io_queue_depth, io_staging;
    int n_slots;
    size_t slot_bytes;
};

struct moe_cache_layer_stats {
    uint64_t hits, misses, bytes_loaded;
    double stall_s;               /* time the engine waited for this layer's experts */
};

#endif
