/**
 * sha256 of a file's chunks while they are being copied, without holding up the
 * copy. Hashing on the main thread inline (each chunk hashed before it may be
 * written) serialised hash and I/O: the next read or write could only start
 * once the hash of a whole chunk was done. `queuedHasher` queues the chunks and
 * hashes them in slices, one slice per turn of the event loop, so that the copy's
 * reads and writes are dispatched between slices and run on the libuv threads
 * while this thread hashes. At most HASH_AHEAD chunks wait (`room()`), so memory
 * stays bounded when hashing is the slower side.
 *
 * Measured (bench/upload-inproc.ts, 2 CPUs): a worker thread fed with the same
 * chunks through SharedArrayBuffers was no faster than hashing inline: fresh shared
 * buffers cost page faults (+50 ms CPU per 256 MB) and on two cores the copy
 * already keeps more than one busy; the queue overlaps at no extra CPU.
 */
import { createHash, type Hash } from "node:crypto";

/** Chunks given to a hasher and not yet hashed, at most (before `room()` waits). */
const HASH_AHEAD = 4;

export interface ChunkHasher {
  /** A buffer for the next chunk (handed to the hasher as it is, so never reused). */
  alloc(size: number): Buffer;
  /** Adds `chunk` (from `alloc`, not modified afterwards) after the chunks given before it. */
  update(chunk: Buffer): void;
  /** Resolves once few enough chunks wait to be hashed that another may be read. */
  room(): Promise<void>;
  /** The sha256 (hex) of every chunk given, in order. Ends the hasher. */
  digest(): Promise<string>;
  /** Ends the hasher without a digest (idempotent, and a no-op after `digest`). */
  close(): void;
}

/** The hasher uploads use. */
export function newChunkHasher(): ChunkHasher {
  return queuedHasher();
}

/** Hashes each chunk as it is given, before anything else runs: the earlier behaviour, kept to measure against. */
export function mainThreadHasher(): ChunkHasher {
  let hash: Hash | null = createHash("sha256");
  return {
    alloc: (size) => Buffer.allocUnsafe(size),
    update: (chunk) => {
      if (!hash) throw new Error("hasher already ended");
      hash.update(chunk);
    },
    room: () => Promise.resolve(),
    digest: async () => {
      if (!hash) throw new Error("hasher already ended");
      const hex = hash.digest("hex");
      hash = null;
      return hex;
    },
    close: () => {
      hash = null;
    },
  };
}

/**
 * On this thread, but off the critical path of the copy: chunks are queued and
 * hashed in slices of `slice` bytes, one slice per turn of the event loop, so
 * the reads and writes the copy is waiting for are started between slices.
 */
export function queuedHasher(slice = 256 * 1024): ChunkHasher {
  const hash = createHash("sha256");
  const queue: Buffer[] = [];
  let ended = false;
  let running = false;
  let failure: Error | null = null;
  let roomWaiter: (() => void) | null = null;
  let drained: (() => void) | null = null;
  const pump = () => {
    running = true;
    const c = queue[0];
    if (!c || ended) {
      running = false;
      drained?.();
      return;
    }
    try {
      if (c.length <= slice) {
        hash.update(c);
        queue.shift();
      } else {
        hash.update(c.subarray(0, slice));
        queue[0] = c.subarray(slice);
      }
    } catch (err) {
      failure = err as Error;
      queue.length = 0;
    }
    if (queue.length < HASH_AHEAD && roomWaiter) {
      const r = roomWaiter;
      roomWaiter = null;
      r();
    }
    setImmediate(pump);
  };
  return {
    alloc: (size) => Buffer.allocUnsafe(size),
    update: (chunk) => {
      if (failure) throw failure;
      if (ended) throw new Error("hasher already ended");
      queue.push(chunk);
      if (!running) {
        running = true;
        setImmediate(pump);
      }
    },
    room: () => {
      if (queue.length < HASH_AHEAD || ended) return Promise.resolve();
      return new Promise<void>((resolve) => (roomWaiter = resolve));
    },
    digest: async () => {
      if (ended) throw new Error("hasher already ended");
      if (running) await new Promise<void>((resolve) => (drained = resolve));
      if (failure) throw failure;
      ended = true;
      return hash.digest("hex");
    },
    close: () => {
      ended = true;
      queue.length = 0;
      const r = roomWaiter;
      roomWaiter = null;
      r?.();
    },
  };
}
