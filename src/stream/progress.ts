/**
 * Progress of long work (bootstrap, replay, restore): a bar with counts and ETA
 * on a terminal, one JSON line at most every `everyMs` otherwise (for logs).
 */
export interface ProgressLine {
  progress: string;
  done: number;
  total: number;
  etaS: number | null;
}

export class Progress {
  private done = 0;
  private readonly t0 = Date.now();
  private lastEmit = 0;

  constructor(
    private readonly label: string,
    private total: number,
    private readonly json: (line: ProgressLine) => void,
    private readonly tty: NodeJS.WriteStream | null = process.stderr.isTTY ? process.stderr : null,
    private readonly everyMs = 1000,
  ) {}

  grow(total: number): void {
    this.total = Math.max(this.total, total);
  }

  add(n: number): void {
    this.done += n;
    this.emit(false);
  }

  finish(): void {
    this.total = Math.max(this.total, this.done);
    this.emit(true);
    if (this.tty) this.tty.write("\n");
  }

  /** Where it stands now (counts and ETA). */
  snapshot(): ProgressLine {
    return this.line();
  }

  private line(): ProgressLine {
    const elapsed = (Date.now() - this.t0) / 1000;
    const rate = this.done / Math.max(elapsed, 0.001);
    const left = Math.max(this.total - this.done, 0);
    return { progress: this.label, done: this.done, total: this.total, etaS: this.done > 0 ? Math.round(left / rate) : null };
  }

  private emit(force: boolean): void {
    const now = Date.now();
    if (!force && now - this.lastEmit < (this.tty ? 100 : this.everyMs)) return;
    this.lastEmit = now;
    const l = this.line();
    if (!this.tty) return this.json(l);
    const width = 30;
    const filled = l.total > 0 ? Math.round((width * Math.min(l.done, l.total)) / l.total) : width;
    const eta = l.etaS === null ? "" : `  ETA ${l.etaS}s`;
    this.tty.write(`\r${this.label} [${"#".repeat(filled)}${".".repeat(width - filled)}] ${l.done}/${l.total}${eta}   `);
  }
}
