/**
 * Opening the store as a node (or the operator) uses it: secured or plain,
 * never a mix.
 */
import { existsSync } from "node:fs";
import { StoreUnavailableError, type ObjectStore } from "../store/store.js";
import { SecureStore } from "./securestore.js";
import { KeyConfigError, pinnedOperator, readKeyFile, TRUST_PREFIX } from "./trust.js";
import { newestTrustList, Vault } from "./vault.js";

/**
 * The store as a node (or the operator) uses it: a SecureStore when the
 * cluster is secured. Refuses a mixed setup: a key file for a plain store, or
 * no key file for a secured one.
 *
 * - `keyFile`: this node's key file (it need not exist: then the node is plain).
 * - `trustCache`: where the accepted trust list is kept. With it a node starts
 *   while the store is down, and never accepts an older list than it has seen.
 */
export async function secureStore(inner: ObjectStore, o: { keyFile?: string; trustCache?: string }): Promise<ObjectStore> {
  const keyPath = o.keyFile && existsSync(o.keyFile) ? o.keyFile : process.env.UNISYNC_KEY_FILE;
  if (!keyPath) {
    const secured = await inner.list(TRUST_PREFIX, { limit: 1 }).then(
      (p) => p.objects[0]?.key,
      (err) => {
        if (err instanceof StoreUnavailableError) return undefined; // checked again by every reader: sealed segments are refused
        throw err;
      },
    );
    if (secured) {
      throw new KeyConfigError(
        `${inner.description} holds a secured cluster (${secured}) and this node has no key file${o.keyFile ? ` (${o.keyFile})` : ""}. ` +
          `Join it with: unisync keys node INSTANCE_DIR --operator OPERATOR_PUBLIC_KEY, then have the operator run "unisync keys add" with the line it prints`,
      );
    }
    return inner;
  }
  const keys = readKeyFile(keyPath);
  const cached = o.trustCache ? Vault.fromCache(keys, o.trustCache) : null;
  let newest: Awaited<ReturnType<typeof newestTrustList>>;
  try {
    newest = await newestTrustList(inner, pinnedOperator(keys));
  } catch (err) {
    if (!(err instanceof StoreUnavailableError)) throw err;
    if (cached) return new SecureStore(inner, cached);
    throw new KeyConfigError(`the store is unreachable and this node has not read the cluster's trust list yet: ${err.message}`);
  }
  if (!newest) {
    throw new KeyConfigError(
      cached
        ? `${inner.description} holds no trust list, but this node accepted version ${cached.trust.version} of one: wrong store, or its cluster/trust/ was deleted. Refusing to write in clear`
        : `this node has a key file (${keyPath}) but ${inner.description} is not a secured cluster: run "unisync keys init" on the store, or use another store`,
    );
  }
  if (cached) {
    // A list older than the cached one was put back by someone with bucket access: the cached one stays.
    if (newest.list.cluster !== cached.trust.cluster) throw new KeyConfigError(`${inner.description} holds another cluster (${newest.list.cluster}) than this node joined (${cached.trust.cluster})`);
    await cached.refresh(inner);
    return new SecureStore(inner, cached);
  }
  return new SecureStore(inner, new Vault(keys, newest.bytes, o.trustCache));
}
