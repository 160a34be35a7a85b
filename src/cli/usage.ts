/** Bad input on the command line: one line on stderr, exit code 2 (see main.ts). */
export class BadInputError extends Error {
  override name = "BadInputError";
  readonly code = "BAD_INPUT";
}

/** An ISO 8601 time as wall milliseconds, or bad input that names the option. */
export function parseTime(option: string, v: string): number {
  // Date.parse accepts much more than ISO 8601 ("1", "March 7"); insist on a date first.
  const ms = /^\d{4}-\d{2}-\d{2}([T ][\d:.]+)?(Z|[+-]\d{2}:?\d{2})?$/.test(v.trim()) ? Date.parse(v) : NaN;
  if (Number.isNaN(ms)) throw new BadInputError(`--${option} must be an ISO 8601 time such as 2026-11-25T14:00:00Z, got ${JSON.stringify(v)}`);
  return ms;
}
