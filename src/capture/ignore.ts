/**
 * What the folder sync never touches, decided by NAME before any file is opened:
 * SQLite databases and their -wal/-shm/-journal companions (synced row by row,
 * and opening one the agent holds would drop its POSIX locks), unisync's own
 * state and temp files, logs, temp and editor swap files, OS metadata, names
 * that cannot be written safely on every node, and the user's `.unisyncignore`
 * (gitignore syntax). The 16-byte SQLite header check comes after these, in the
 * scanner, and never on a file the agent holds open as a database.
 */

/** Prefix of the temp files replay writes beside their target (never synced). */
export const TEMP_PREFIX = ".unisync-tmp-";
export const STATE_DIR = ".unisync";
export const IGNORE_FILE = ".unisyncignore";

const DB_NAME = /\.(db|db3|sqlite|sqlite3)$/i;
const COMPANION = /-(wal|shm|journal)$/i;

/** Why a name is never synced, or null. `rel` is '/'-separated and relative to the folder. */
export function builtinExclusion(rel: string, isDir: boolean): string | null {
  const parts = rel.split("/");
  const name = parts[parts.length - 1]!;
  if (parts[0] === STATE_DIR) return "unisync's own state (.unisync/)";
  if (parts.some((p) => p.startsWith(TEMP_PREFIX))) return "unisync temp file";
  if (parts.slice(0, isDir ? parts.length : -1).includes("logs")) return "log folder (logs/)";
  if (isDir) return null;
  if (COMPANION.test(name)) return "SQLite companion file (-wal/-shm/-journal)";
  if (DB_NAME.test(name)) return "SQLite database by name (synced row by row, never as a file)";
  if (/\.log(\.\d+)?$/i.test(name)) return "log file";
  if (/\.(tmp|temp)$/i.test(name)) return "temp file";
  if (/\.(swp|swo|swx)$/i.test(name) || name.endsWith("~") || name.startsWith(".#") || /^#.*#$/.test(name)) return "editor swap/backup file";
  if (/^(desktop\.ini|\.DS_Store|Thumbs\.db|\.directory)$/i.test(name)) return "OS metadata file";
  return null;
}

const WINDOWS_RESERVED = /^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?$/i;
// Characters Windows refuses, control characters and the path separators.
const INVALID_CHARS = /[<>:"|?*\\\u0000-\u001f]/;

/**
 * Why a relative path is unsafe to write on every node, or null when it is fine:
 * absolute, '..', empty or '.' parts, NUL and control characters, Windows
 * reserved names (CON, PRN, AUX, NUL, COM1, LPT1, ...) and characters, trailing
 * dots or spaces, over-long names.
 */
export function unsafePathReason(rel: string): string | null {
  if (typeof rel !== "string" || rel.length === 0) return "empty path";
  if (rel.includes("\0")) return "contains a NUL character";
  if (rel.startsWith("/") || /^[A-Za-z]:/.test(rel) || rel.startsWith("\\")) return "absolute path";
  if (rel.length > 4096) return "path too long";
  for (const part of rel.split("/")) {
    if (part === "" ) return "empty path component ('//' or trailing '/')";
    if (part === "." || part === "..") return `'${part}' path component`;
    if (INVALID_CHARS.test(part)) return `invalid character in ${JSON.stringify(part)}`;
    if (WINDOWS_RESERVED.test(part)) return `Windows reserved name ${JSON.stringify(part)}`;
    if (/[. ]$/.test(part)) return `name ends with a dot or space: ${JSON.stringify(part)}`;
    if (Buffer.byteLength(part) > 255) return "name longer than 255 bytes";
  }
  return null;
}

// ---------------------------------------------------------------------------
// gitignore syntax

interface Rule {
  re: RegExp;
  negate: boolean;
  dirOnly: boolean;
}

/** Translates one gitignore glob (without '!' and trailing '/') into a regex body. */
function globToRegex(glob: string): string {
  let out = "";
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]!;
    if (c === "*") {
      if (glob[i + 1] === "*") {
        const before = i === 0 || glob[i - 1] === "/";
        const after = i + 2 === glob.length || glob[i + 2] === "/";
        if (before && after) {
          if (i + 2 === glob.length) {
            out += ".*"; // trailing '/**': everything inside
          } else {
            out += "(?:.*/)?"; // '**/': zero or more directories
            i++; // the '/' after '**'
          }
          i++;
          continue;
        }
        // '**' not delimited by slashes behaves like '*'
        i++;
      }
      out += "[^/]*";
    } else if (c === "?") {
      out += "[^/]";
    } else if (c === "[") {
      const end = glob.indexOf("]", i + 2);
      if (end < 0) {
        out += "\\[";
        continue;
      }
      let body = glob.slice(i + 1, end);
      let neg = false;
      if (body.startsWith("!") || body.startsWith("^")) {
        neg = true;
        body = body.slice(1);
      }
      body = body.replace(/\\/g, "\\\\").replace(/\]/g, "\\]").replace(/\[/g, "\\[");
      out += `(?!/)[${neg ? "^" : ""}${body}]`;
      i = end;
    } else if (c === "\\" && i + 1 < glob.length) {
      out += glob[i + 1]!.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
      i++;
    } else {
      out += c.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
    }
  }
  return out;
}

/** A compiled .gitignore-syntax list. */
export class IgnoreRules {
  private readonly rules: Rule[] = [];

  constructor(text = "") {
    for (let raw of text.split(/\r?\n/)) {
      // Trailing spaces are ignored unless escaped.
      raw = raw.replace(/(?<!\\)\s+$/, "");
      if (raw === "" || raw.startsWith("#")) continue;
      let negate = false;
      if (raw.startsWith("!")) {
        negate = true;
        raw = raw.slice(1);
      } else if (raw.startsWith("\\!") || raw.startsWith("\\#")) {
        raw = raw.slice(1);
      }
      let dirOnly = false;
      if (raw.endsWith("/")) {
        dirOnly = true;
        raw = raw.replace(/\/+$/, "");
      }
      if (raw === "") continue;
      // A slash at the start or in the middle anchors the pattern to the folder root.
      const anchored = raw.includes("/");
      if (raw.startsWith("/")) raw = raw.slice(1);
      const body = globToRegex(raw);
      const re = new RegExp(anchored ? `^${body}$` : `^(?:.*/)?${body}$`, "u");
      this.rules.push({ re, negate, dirOnly });
    }
  }

  get size(): number {
    return this.rules.length;
  }

  /** The last matching rule decides; null when no rule matches. */
  private decide(rel: string, isDir: boolean): boolean | null {
    let result: boolean | null = null;
    for (const r of this.rules) {
      if (r.dirOnly && !isDir) continue;
      if (r.re.test(rel)) result = !r.negate;
    }
    return result;
  }

  /**
   * Whether `rel` ('/'-separated, relative to the root) is ignored. As in git, a
   * file inside an ignored directory is ignored and cannot be re-included.
   */
  ignores(rel: string, isDir: boolean): boolean {
    const parts = rel.split("/");
    for (let i = 1; i < parts.length; i++) {
      if (this.decide(parts.slice(0, i).join("/"), true) === true) return true;
    }
    return this.decide(rel, isDir) === true;
  }
}

/** Every reason a path is not synced, by name only (no file is opened). */
export function exclusionByName(rel: string, isDir: boolean, user: IgnoreRules): string | null {
  const builtin = builtinExclusion(rel, isDir);
  if (builtin) return builtin;
  const unsafe = unsafePathReason(rel);
  if (unsafe) return `name cannot be synced safely: ${unsafe}`;
  if (user.ignores(rel, isDir)) return `matched by ${IGNORE_FILE}`;
  return null;
}
