import path from "node:path";
import { describe, expect, it } from "vitest";
import { FileStore } from "../src/store/file.js";
import { S3Store } from "../src/store/s3.js";
import { StoreConfigError } from "../src/store/store.js";
import { openStore, parseStoreUrl, redactUrl } from "../src/store/url.js";

describe("parseStoreUrl", () => {
  it("accepts file URLs and plain paths", () => {
    expect(parseStoreUrl("file:///srv/store", {})).toEqual({ kind: "file", root: "/srv/store" });
    expect(parseStoreUrl("file:rel/dir", {})).toEqual({ kind: "file", root: path.resolve("rel/dir") });
    expect(parseStoreUrl("/abs/dir", {})).toEqual({ kind: "file", root: "/abs/dir" });
    expect(parseStoreUrl("./here", {})).toEqual({ kind: "file", root: path.resolve("here") });
    expect(parseStoreUrl("file:///with%20space", {})).toEqual({ kind: "file", root: "/with space" });
  });

  it("parses s3 URLs with query parameters", () => {
    expect(parseStoreUrl("s3://my-bucket/some/prefix?endpoint=http://127.0.0.1:9000&region=eu-west-1&path_style=false", {})).toEqual({
      kind: "s3",
      bucket: "my-bucket",
      prefix: "some/prefix",
      endpoint: "http://127.0.0.1:9000",
      region: "eu-west-1",
      forcePathStyle: false,
    });
    expect(parseStoreUrl("s3://my-bucket", {})).toEqual({
      kind: "s3",
      bucket: "my-bucket",
      prefix: "",
      endpoint: undefined,
      region: "us-east-1",
      forcePathStyle: false,
    });
  });

  it("falls back to the environment", () => {
    const spec = parseStoreUrl("s3://b-1/p/", {
      AWS_ENDPOINT_URL: "http://minio:9000",
      AWS_DEFAULT_REGION: "eu-central-1",
      AWS_ACCESS_KEY_ID: "id",
      AWS_SECRET_ACCESS_KEY: "secret",
    });
    expect(spec).toMatchObject({ endpoint: "http://minio:9000", region: "eu-central-1", forcePathStyle: true, prefix: "p/" });
    expect(spec.kind === "s3" && spec.credentials).toEqual({ accessKeyId: "id", secretAccessKey: "secret", sessionToken: undefined });
    // The S3-specific endpoint and AWS_REGION win; UNISYNC_S3_PATH_STYLE overrides the endpoint default.
    expect(
      parseStoreUrl("s3://b-1", {
        AWS_ENDPOINT_URL: "http://a:1",
        AWS_ENDPOINT_URL_S3: "http://s3:2",
        AWS_REGION: "ap-south-1",
        AWS_DEFAULT_REGION: "eu-central-1",
        UNISYNC_S3_PATH_STYLE: "false",
      }),
    ).toMatchObject({ endpoint: "http://s3:2", region: "ap-south-1", forcePathStyle: false });
    // Query parameters beat the environment.
    expect(parseStoreUrl("s3://b-1?endpoint=http://q:3&region=x-1", { AWS_ENDPOINT_URL_S3: "http://s3:2", AWS_REGION: "y" })).toMatchObject({
      endpoint: "http://q:3",
      region: "x-1",
    });
  });

  it("rejects credentials in the URL and unknown schemes", () => {
    expect(() => parseStoreUrl("s3://key:secret@bucket/p", {})).toThrow(StoreConfigError);
    expect(() => parseStoreUrl("s3://key:secret@bucket/p", {})).toThrow(/AWS_ACCESS_KEY_ID/);
    expect(() => parseStoreUrl("s3://key:secret@bucket/p", {})).not.toThrow(/secret@/);
    expect(() => parseStoreUrl("s3://b-1/p?endpoint=http://u:pw@host:9000", {})).toThrow(/must not contain credentials/);
    expect(() => parseStoreUrl("gs://bucket", {})).toThrow(/unsupported scheme "gs:".*s3:\/\/bucket/);
    expect(() => parseStoreUrl("file://remote-host/x", {})).toThrow(StoreConfigError);
    expect(() => parseStoreUrl("s3://b-1/%zz", {})).toThrow(/percent-encoding/);
  });
});

describe("openStore", () => {
  it("builds the matching backend", () => {
    const file = openStore("file:///tmp/unisync-store", {});
    expect(file).toBeInstanceOf(FileStore);
    expect(file.description).toBe("file:///tmp/unisync-store");
    const s3 = openStore("s3://bkt/a/b?endpoint=http://127.0.0.1:9000", { AWS_ACCESS_KEY_ID: "x", AWS_SECRET_ACCESS_KEY: "hidden" });
    expect(s3).toBeInstanceOf(S3Store);
    expect(s3.description).toBe("s3://bkt/a/b/ (http://127.0.0.1:9000)");
    expect(s3.description).not.toContain("hidden");
  });
});

describe("redactUrl", () => {
  it("strips userinfo and secret-looking query values", () => {
    expect(redactUrl("s3://AKIA:secret@bucket/p?region=x")).toBe("s3://bucket/p?region=x");
    expect(redactUrl("https://u:p@host/x?X-Amz-Signature=abc&X-Amz-Credential=id&a=1")).toBe(
      "https://host/x?X-Amz-Signature=***&X-Amz-Credential=***&a=1",
    );
    expect(redactUrl("/plain/path")).toBe("/plain/path");
  });
});
