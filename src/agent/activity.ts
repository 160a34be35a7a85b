/**
 * What the agent did lately, for the console's live feed: a bounded ring of
 * events, each with an increasing id so a reader asks only for what is new.
 */
export interface ActivityEvent {
  id: number;
  atMs: number;
  /** applied: another origin's segments replayed here; uploaded: this node's segments sent; problem / control: the rest. */
  kind: "applied" | "uploaded" | "problem" | "control";
  stream?: string;
  origin?: string;
  text: string;
}

export class Activity {
  private readonly events: ActivityEvent[] = [];
  private nextId = 1;

  constructor(private readonly keep = 300) {}

  add(e: Omit<ActivityEvent, "id" | "atMs">, atMs = Date.now()): void {
    this.events.push({ ...e, id: this.nextId++, atMs });
    if (this.events.length > this.keep) this.events.shift();
  }

  /** Events with an id above `afterId`, oldest first. */
  since(afterId = 0): ActivityEvent[] {
    return this.events.filter((e) => e.id > afterId);
  }
}
