/**
 * Store URLs: `file:///abs/dir`, `file:rel/dir`, a plain path, or
 * `s3://bucket/prefix?endpoint=...&region=...&path_style=true`. Credentials never
 * go in the URL; they come from AWS_* environment variables.
 */
import path from "node:path";
import { fileURLToPath } from "node:url";
import { FileStore } from "./file.js";
import { S3Store, type S3StoreOptions } from "./s3.js";
import { StoreConfigError, type ObjectStore } from "./store.js";

export type StoreSpec =
  | { kind: "file"; root: string }
  | ({ kind: "s3" } & Required<Pick<S3StoreOptions, "bucket" | "prefix" | "region" | "forcePathStyle">> &
      Pick<S3StoreOptions, "endpoint" | "credentials">);

type Env = Record<string, string | undefined>;

const ACCEPTED =
  "accepted forms: file:///absolute/dir, file:relative/dir, a plain directory path, " +
  "or s3://bucket[/prefix][?endpoint=URL&region=NAME&path_style=true|false]";

const S3_PARAMS = new Set(["endpoint", "region", "path_style"]);
const SECRET_NAME = /key|secret|token|password|passwd|signature|credential|auth/i;

function fail(url: string, why: string): never {
  throw new StoreConfigError(`invalid store URL ${JSON.stringify(redactUrl(url))}: ${why}`);
}

function parseBool(url: string, name: string, value: string): boolean {
  if (/^(true|1|yes|on)$/i.test(value)) return true;
  if (/^(false|0|no|off)$/i.test(value)) return false;
  return fail(url, `${name} must be true or false, got ${JSON.stringify(value)}`);
}

export function parseStoreUrl(url: string, env: Env = process.env): StoreSpec {
  const text = url.trim();
  if (text === "") fail(url, `it is empty; ${ACCEPTED}`);
  const scheme = /^([a-zA-Z][a-zA-Z0-9+.-]*):/.exec(text)?.[1]?.toLowerCase();

  if (scheme === undefined) return { kind: "file", root: path.resolve(text) };
  if (scheme === "file") {
    if (!text.startsWith("file://")) {
      const rel = text.slice("file:".length);
      if (rel === "") fail(url, "file: needs a path");
      return { kind: "file", root: path.resolve(rel) };
    }
    try {
      return { kind: "file", root: fileURLToPath(text) };
    } catch (err) {
      return fail(url, `${(err as Error).message}; ${ACCEPTED}`);
    }
  }
  if (scheme !== "s3") fail(url, `unsupported scheme "${scheme}:"; ${ACCEPTED}`);

  const m = /^s3:\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?(#.*)?$/i.exec(text);
  if (!m) return fail(url, ACCEPTED);
  const [, authority = "", rawPath = "", query = "", fragment] = m;
  if (authority.includes("@")) {
    fail(
      url,
      "credentials must not be embedded in the URL; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY " +
        "(and AWS_SESSION_TOKEN if needed) in the environment instead",
    );
  }
  if (fragment) fail(url, "a '#fragment' is not allowed");
  const decode = (part: string): string => {
    try {
      return decodeURIComponent(part);
    } catch {
      return fail(url, `bad percent-encoding in ${JSON.stringify(part)}`);
    }
  };
  const bucket = decode(authority);
  if (!/^[a-zA-Z0-9][a-zA-Z0-9.\-_]{2,62}$/.test(bucket)) {
    fail(url, `"${bucket}" is not a valid bucket name; ${ACCEPTED}`);
  }
  const prefix = decode(rawPath).replace(/^\/+/, "");

  const params = new URLSearchParams(query);
  for (const name of params.keys()) {
    if (SECRET_NAME.test(name)) {
      fail(url, `"${name}" looks like a credential; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment instead`);
    }
    if (!S3_PARAMS.has(name)) fail(url, `unknown parameter "${name}"; supported: endpoint, region, path_style`);
  }

  const endpoint = params.get("endpoint") || env.AWS_ENDPOINT_URL_S3 || env.AWS_ENDPOINT_URL || undefined;
  if (endpoint !== undefined) {
    let parsed: URL;
    try {
      parsed = new URL(endpoint);
    } catch {
      return fail(url, `endpoint ${JSON.stringify(redactUrl(endpoint))} is not a URL (e.g. http://127.0.0.1:9000)`);
    }
    if (parsed.protocol !== "http:" && parsed.protocol !== "https:") fail(url, "endpoint must be an http:// or https:// URL");
    if (parsed.username || parsed.password) fail(url, "the endpoint must not contain credentials; use AWS_* environment variables");
  }
  const region = params.get("region") || env.AWS_REGION || env.AWS_DEFAULT_REGION || "us-east-1";
  const pathStyle = params.get("path_style") ?? env.UNISYNC_S3_PATH_STYLE;
  // Self-hosted endpoints (MinIO, s3rver) rarely have per-bucket DNS names.
  const forcePathStyle = pathStyle ? parseBool(url, "path_style", pathStyle) : endpoint !== undefined;

  const spec: StoreSpec = { kind: "s3", bucket, prefix, region, forcePathStyle, endpoint };
  // Explicit env credentials (e.g. a test's env object); otherwise the SDK chain (profiles, IMDS, ...).
  if (env.AWS_ACCESS_KEY_ID && env.AWS_SECRET_ACCESS_KEY) {
    spec.credentials = {
      accessKeyId: env.AWS_ACCESS_KEY_ID,
      secretAccessKey: env.AWS_SECRET_ACCESS_KEY,
      sessionToken: env.AWS_SESSION_TOKEN || undefined,
    };
  }
  return spec;
}

export function openStore(url: string, env: Env = process.env, extra: Pick<S3StoreOptions, "maxAttempts"> = {}): ObjectStore {
  const spec = parseStoreUrl(url, env);
  if (spec.kind === "file") return new FileStore(spec.root);
  const { kind: _kind, ...options } = spec;
  return new S3Store({ ...options, ...extra });
}

/** The URL with userinfo removed and credential-like query values masked, for logs. */
export function redactUrl(url: string): string {
  let out = url.replace(/^([a-zA-Z][a-zA-Z0-9+.-]*:\/\/)[^/?#]*@/, "$1");
  out = out.replace(/([?&])([^=&#]*)=([^&#]*)/g, (whole, sep: string, name: string) =>
    SECRET_NAME.test(decodeURIComponentSafe(name)) ? `${sep}${name}=***` : whole,
  );
  return out;
}

function decodeURIComponentSafe(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}
