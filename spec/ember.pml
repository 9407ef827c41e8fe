/*
 * ember.pml -- Promela model of ember's cluster load-balancer protocol
 *              for ONE partition (one function).
 *
 * Checked with Spin 6.5 (see spec/README.md and spec/check.py).
 *
 * ------------------------------------------------------------------------
 * RULES (the protocol, as the model implements it)
 * ------------------------------------------------------------------------
 * R1  etcd is one atomic, linearizable store.  It holds
 *       - the leader key (holder `ld`, revision `ep`) bound to the holder's
 *         lease; each election bumps the revision, so epochs strictly grow;
 *       - the journal: per sandbox NONE -> LIVE(on worker jw[s]) -> DEAD;
 *       - per worker a session key with an incarnation number `winc[w]`.
 * R2  At most one assigner holds the leader key.  A holder whose lease
 *     expired (crash, pause, partition) keeps running on stale memory until
 *     it notices (step_down); it is "deposed but unaware" meanwhile.
 * R3  Every journal write is an etcd transaction guarded by
 *     "leader key still has my revision".  A deposed leader cannot journal.
 * R4  A new leader reads the journal, then RECONCILES: it sends SYNC(epoch)
 *     to every worker and waits for each worker's inventory (idle/busy
 *     sandboxes).  Only after all inventories arrived does it SERVE.
 *     Until then acquires/releases addressed to it wait in the network.
 * R5  The leader keeps busy/idle in memory only.  Only sandbox lifecycle
 *     (created on W, destroyed) goes to the journal.
 * R6  acquire(R) is idempotent per request id: a retry of R at the same
 *     leader gets the same grant.  A leader never has more than RC
 *     sandboxes BUSY or STARTING (reserved concurrency); beyond that it
 *     answers THROTTLED.
 * R7  Cold start: placement picks a worker, the leader journals the
 *     sandbox (R3) bound to the worker's current incarnation and sends
 *     START(s, epoch, incarnation); a worker ignores a START for another
 *     incarnation (refinement F2, README); it answers READY to whoever
 *     leads now and the leader grants the sandbox to the request that
 *     caused the cold start.
 * R8  Every message from a leader carries its epoch (fencing token).  A
 *     worker remembers the highest epoch it saw (wmax) and ignores leader
 *     messages with a lower epoch.  On restart a worker re-reads the
 *     current epoch from etcd before serving (F1, README).
 * R9  A worker accepts INVOKE(s, epoch, R) only if s is on it and IDLE and
 *     epoch >= wmax; it runs at most one invocation per sandbox.  The
 *     result goes straight to the frontend; the release goes to whoever
 *     holds the leader key now (read from etcd).
 * R10 A frontend sends the payload of a request AT MOST ONCE.  It may
 *     retry acquire (same request id) until it sent the payload; after
 *     that, a missing result becomes an error for the client
 *     (at-most-once semantics; "each request runs at most once").
 * R11 Timers are modelled with Spin's `timeout` (fires only when nothing
 *     else in the system can move = "a long time passed"); MAX_EARLY times
 *     a timer may fire prematurely while work is in flight:
 *       - a frontend retries acquire (bounded, MAX_RETRY) or gives up;
 *       - a leader re-sends SYNC to workers it still waits for;
 *       - a serving leader probes (SYNC) workers of sandboxes it believes
 *         BUSY/STARTING (timed_out): the worker's inventory is the truth,
 *         except for sandboxes the leader changed itself since it sent the
 *         probe (refinement F3, README).  Every probe has a number; SYNC
 *         carries it and the worker echoes it in INV.  The leader remembers
 *         per sandbox the number of the latest probe covering it, and an
 *         inventory overrides a sandbox only if its number is that one
 *         (refinement F4, README);
 *       - now and then a serving leader probes EVERY worker about EVERY
 *         sandbox it knows (full_probe, "anti-entropy"); the inventories
 *         list orphans, which get DESTROY (refinement F5, README).
 * R12 A leader watches the worker session keys: a new incarnation means
 *     the worker restarted and all its sandboxes are gone (sandbox_exited).
 * R13 Eviction (keep-alive expiry or memory budget, Assigner.tick): at any
 *     moment a serving leader may evict a sandbox IDLE in its table (the
 *     nondeterministic choice stands for the policy).  It journals the
 *     sandbox dead (R3) and sends DESTROY(s, epoch); the worker destroys it
 *     only if it is IDLE there (H4), so DESTROY never ends a running
 *     invocation.  MAX_EVICT evictions per run.
 * R14 Pre-warm (a policy that prewarms, Assigner.tick R7): a serving leader
 *     may start a sandbox for no request, only when nothing is idle,
 *     starting or busy in its table.  It is journaled and started like a
 *     cold start, turns IDLE on READY, and an acquire that finds no idle
 *     sandbox waits for it (claims it) instead of starting another.  At no
 *     time do more than MAX_STARTING sandboxes start (the herd bound, the
 *     core's max_starting).  MAX_PREWARM pre-warms per run.
 *
 * Faults (bounded, see README "Bounds"): leader lease expiry with the old
 * leader either crashed (memory wiped) or paused (keeps stale memory);
 * worker crash+restart; loss of any message; arbitrary reordering (the
 * network is an unordered bag of slots).
 * ------------------------------------------------------------------------
 * Mutants (compile with -D<NAME>; each must produce a counterexample):
 *   MUTANT_NO_FENCING        worker ignores the lease epoch on INVOKE
 *   MUTANT_ACCEPT_BUSY       worker accepts INVOKE on a busy sandbox
 *   MUTANT_NO_RECONCILE      new leader serves straight from the journal
 *   MUTANT_RESEND_PAYLOAD    frontend re-acquires and re-sends on timeout
 *   MUTANT_NO_CLIENT_TIMEOUT frontend waits for a result forever
 *   MUTANT_STALE_PROBE       leader applies a probe answer that is older
 *                            than its own later change of the sandbox
 *   MUTANT_NO_INCARNATION    worker runs a START sent to its previous
 *                            incarnation
 *   MUTANT_NO_PROBE          serving leader never probes (neither
 *                            timed_out nor full_probe)
 *   MUTANT_NO_PROBE_NUMBER   a probe answer applies to every sandbox in
 *                            ANY probe, not only the latest one (F4 removed)
 *   MUTANT_NO_FULL_PROBE     no periodic full probe (F5 removed)
 *   MUTANT_UNFENCED_JOURNAL  journal txn does not compare the leader key
 *   MUTANT_DESTROY_ANY       worker destroys a sandbox whatever its state
 *                            (busy included)
 *   MUTANT_EVICT_GRANTED     leader evicts a sandbox it has granted (BUSY in
 *                            its table: the lease is outstanding)
 *   MUTANT_PREWARM_HERD      pre-warm ignores the herd bound (starts while
 *                            other sandboxes are starting or in use)
 * ------------------------------------------------------------------------
 */

/* ---------------- sizes and bounds (override with -D) ---------------- */
#define NA 2            /* assigners                                     */
#define NW 2            /* workers                                       */
#define NS 3            /* sandbox ids of the function (never reused)    */
#ifndef NR
#define NR 3            /* requests: R0,R1 from frontend F0, R2 from F1  */
#endif
#define RC 2            /* reserved concurrency                          */
#define NSLOT 10        /* network capacity (asserted never exceeded)   */
#ifndef MAX_LFAULT
#define MAX_LFAULT 1    /* leader lease expiries (crash or pause)        */
#endif
#ifndef MAX_WFAULT
#define MAX_WFAULT 1    /* worker crash+restart                          */
#endif
#ifndef MAX_DROP
#define MAX_DROP 1      /* lost messages                                 */
#endif
#ifndef MAX_EARLY
#define MAX_EARLY 1     /* timers firing before the system is quiet     */
#endif
#ifndef MAX_RETRY
#define MAX_RETRY 1     /* acquire retries per request (SDK retry limit) */
#endif
#ifndef MAX_EVICT
#define MAX_EVICT 0     /* leader-side evictions of idle sandboxes (R13)  */
#endif
#ifndef MAX_PREWARM
#define MAX_PREWARM 0   /* leader-side pre-warm starts (R14)              */
#endif
#define MAX_STARTING 2  /* herd bound: sandboxes starting at once (R14)   */

#define NONE 255

/* message types; receiver class in brackets */
#define ACQ     1   /* [assigner d] e=epoch x=request                    */
#define GRANT   2   /* [request d]  e=epoch x=sandbox                    */
#define FAIL    3   /* [request d]  x=1 throttled, 0 error               */
#define RESULT  4   /* [request d]                                       */
#define INVOKE  5   /* [worker d]   e=lease epoch x=sandbox y=request    */
#define START   6   /* [worker d]   e=epoch x=sandbox y=worker incarnation */
#define READY   7   /* [assigner d] e=epoch x=sandbox (to current leader) */
#define RELEASE 8   /* [assigner d] e=epoch x=sandbox y=request          */
#define SYNC    9   /* [worker d]   e=epoch x=assigner p=probe (0: reconcile) */
#define INV     10  /* [assigner d] e=epoch x=worker y=idle|busy<<3 p=probe echoed */
#define DESTROY 11  /* [worker d]   e=epoch x=sandbox                    */


/* ---------------- etcd (atomic linearizable store) ------------------- */
byte ld = NONE;                 /* leader key holder                     */
byte ep = 0;                    /* leader key revision = current epoch   */
#define J_NONE 0
#define J_LIVE 1
#define J_DEAD 2
byte jst[NS];                   /* journal: sandbox lifecycle            */
byte jw[NS];                    /* journal: worker of the sandbox        */
byte jinc[NS];                  /* journal: ... and its incarnation (F2) */
byte winc[NW];                  /* worker session incarnation            */

/* ---------------- assigners (leader state is in memory only) --------- */
#define FOLLOWER    0
#define RECONCILING 1
#define SERVING     2
byte role[NA];
byte myep[NA];                  /* epoch this assigner won               */
byte synced[NA];                /* bitmask of workers reconciled         */
byte pnum[NA*NS];               /* latest probe covering the sandbox, 0 if none
                                   or touched since (F3, F4)                  */
byte pctr[NA];                  /* number of the last probe sent (F4)       */
byte wseen[NA*NW];              /* worker incarnations at election       */
#define L_NONE     0
#define L_STARTING 1
#define L_IDLE     2
#define L_BUSY     3
byte lt[NA*NS];                 /* leader table: busy/idle per sandbox   */
byte lrq[NA*NS];                /* request holding the sandbox / NONE    */
#define LT(a,s)  lt[(a)*NS+(s)]
#define LRQ(a,s) lrq[(a)*NS+(s)]
#define PN(a,s)  pnum[(a)*NS+(s)]
/* Probe numbers count modulo PMOD = MAX_EARLY+1 (values 1..PMOD, 0 = "in
 * no probe").  This is enough: while a probe's SYNC or INV is in flight a
 * timer can only fire early (timeout needs every message delivered), so at
 * most MAX_EARLY newer probes can be sent before that INV arrives, and a
 * number is never reused while an answer carrying it is in flight.     */
#define PMOD (MAX_EARLY+1)
#if PMOD > 7
#error "probe numbers are packed in 3 bits: MAX_EARLY must be < 7"
#endif

/* ---------------- workers (source of truth) -------------------------- */
#define W_ABSENT 0
#define W_IDLE   1
#define W_BUSY   2
byte ws[NS];                    /* state of sandbox s on worker jw[s]    */
byte wr[NS];                    /* request running in s                  */
byte wmax[NW];                  /* highest epoch seen by the worker      */

/* ---------------- frontends ------------------------------------------ */
#define F_INIT 0
#define F_ACQ  1                /* acquiring, may retry                  */
#define F_SENT 2                /* payload sent, waiting for the result  */
#define F_OK   3
#define F_ERR  4
#define F_THR  5                /* throttled (reserved concurrency)      */
byte fst[NR];
byte retries[NR];

/* ---------------- faults --------------------------------------------- */
byte lfaults, wfaults, drops, early;
byte evicts, prewarms;           /* policy actions taken (R13, R14)      */

/* ---------------- ghost / monitor variables -------------------------- */
byte running[NS];               /* invocations running per sandbox       */
byte nrun;                      /* invocations running in the partition  */
byte runs[NR];                  /* times request r started on a worker   */
byte outcomes[NR];              /* results/errors handed to the client   */
byte serving_ep;                /* highest epoch that reached SERVING    */

/* scratch (always reset to 0 before an atomic step ends) */
byte k, i, j, n, i2, mt, mp, md, me, mx, my;
int nkey;

/* ---------------- helpers -------------------------------------------- */
/* The network is an unordered bag of messages.  A message is packed into
 * one int: t<<27 | p<<24 | d<<16 | e<<8 | x<<6 | y (p: probe number of a
 * SYNC/INV, 0 otherwise).  The bag is kept sorted
 * (descending, empty slots = 0 last), so two states holding the same
 * multiset of messages are the same state.  Receivers may take ANY slot,
 * so delivery order is arbitrary.                                        */
int net[NSLOT];
byte nn;                        /* messages in flight = used slots        */
#define MT(K) (net[K] >> 27)
#define MP(K) ((net[K] >> 24) & 7)
#define MD(K) ((net[K] >> 16) & 255)
#define ME(K) ((net[K] >> 8) & 255)
#define MX(K) ((net[K] >> 6) & 3)
#define MY(K) (net[K] & 63)

inline sendp(T, D, E, X, Y, P) { /* append; settle() restores the order   */
  assert(nn < NSLOT);           /* network capacity is large enough       */
  net[nn] = (T << 27) | (P << 24) | (D << 16) | (E << 8) | (X << 6) | Y;
  nn++
}
inline send(T, D, E, X, Y) { sendp(T, D, E, X, Y, 0) }

inline take(K) {                /* remove message K into scratch mt..my   */
  mt = MT(K); mp = MP(K); md = MD(K); me = ME(K); mx = MX(K); my = MY(K);
  remove(K)
}

inline remove(K) {              /* delete slot K: move the last one in    */
  nn--; net[K] = net[nn]; net[nn] = 0
}

inline settle() {               /* insertion sort, descending             */
  i2 = 1;
  do
  :: i2 < nn ->
       nkey = net[i2]; n = i2;
       do
       :: n > 0 && net[n-1] < nkey -> net[n] = net[n-1]; n--
       :: else -> break
       od;
       net[n] = nkey; i2++
  :: else -> break
  od;
  i2 = 0; n = 0; nkey = 0
}

inline clear_scratch() { settle(); k = 0; i = 0; j = 0; n = 0; mt = 0; mp = 0; md = 0; me = 0; mx = 0; my = 0 }

/* one d_step option per network slot: a receiver may take ANY message */
#define SLOTS(OPT) OPT(0) OPT(1) OPT(2) OPT(3) OPT(4) OPT(5) OPT(6) OPT(7) OPT(8) OPT(9)

/* sandbox s: the journal, the worker and the table of leader a agree:
 * live and idle / live and busy / not live and gone everywhere */
#define CONS(a,s) ((jst[s] == J_LIVE && ws[s] == W_IDLE && lt[a*NS+s] == L_IDLE) || \
                   (jst[s] == J_LIVE && ws[s] == W_BUSY && lt[a*NS+s] == L_BUSY) || \
                   (jst[s] != J_LIVE && ws[s] == W_ABSENT && lt[a*NS+s] == L_NONE))
/* some sandbox where they disagree (guard of a_full_probe) */
#define DIVERGED(a) (!(CONS(a,0) && CONS(a,1) && CONS(a,2)))

/* Timers (R11).  A timer normally fires on `timeout`, i.e. when nothing
 * else can move ("a long time passed").  MAX_EARLY times in a run a timer
 * may instead fire prematurely while work is still in flight (slow
 * network, GC pause): a message is in the network or a sandbox is busy. */
#define EARLY_OK (early < MAX_EARLY && (nn != 0 || \
                  ws[0] == W_BUSY || ws[1] == W_BUSY || ws[2] == W_BUSY))
#define TIMER (timeout || EARLY_OK)
inline timer_fired() {
  if :: !timeout -> early++; printf("f_early_timer\n") :: else fi
}

/* =====================================================================
 * Frontend: one process per request r (R10).
 * ===================================================================== */
#define FR_MSG(K) (MD(K) == r && (MT(K) == GRANT || MT(K) == FAIL || MT(K) == RESULT))

inline fe_handle() {
  if
  :: mt == GRANT && fst[r] == F_ACQ ->             /* fe_on_grant: send the payload, once */
       printf("fe_on_grant r=%d s=%d w=%d ep=%d\n", r, mx, jw[mx], me);
       fst[r] = F_SENT; send(INVOKE, jw[mx], me, mx, r)
  :: mt == FAIL && (fst[r] == F_ACQ || fst[r] == F_SENT) ->      /* fe_on_fail */
       printf("fe_on_fail r=%d throttled=%d\n", r, mx);
       fst[r] = (mx -> F_THR : F_ERR); outcomes[r]++
  :: mt == RESULT && fst[r] == F_SENT ->           /* fe_on_result */
       printf("fe_on_result r=%d\n", r);
       fst[r] = F_OK; outcomes[r]++
  :: else -> skip                                  /* fe_discard: late or duplicate */
  fi;
  assert(outcomes[r] <= 1)                         /* property (c) */
}
#define FE_OPT(K) :: d_step { FR_MSG(K) -> take(K); fe_handle(); clear_scratch() }

proctype Frontend(byte r) {
  /* fe_send_acquire: resolve the leader through etcd, send acquire(r) */
  d_step { ld != NONE -> printf("fe_send_acquire r=%d to a=%d ep=%d\n", r, ld, ep);
           fst[r] = F_ACQ; send(ACQ, ld, ep, r, 0); settle() };
end:
  do
  SLOTS(FE_OPT)
  :: d_step { TIMER && fst[r] == F_ACQ ->           /* fe_retry_acquire */
       timer_fired();
       if
       :: retries[r] < MAX_RETRY && ld != NONE -> printf("fe_retry_acquire r=%d to a=%d ep=%d\n", r, ld, ep);
            retries[r]++; send(ACQ, ld, ep, r, 0)
       :: else -> printf("fe_give_up r=%d (acquire)\n", r); fst[r] = F_ERR; outcomes[r]++
       fi; settle() }
#ifndef MUTANT_NO_CLIENT_TIMEOUT
  :: d_step { TIMER && fst[r] == F_SENT ->          /* fe_give_up */
       timer_fired();
#ifdef MUTANT_RESEND_PAYLOAD
       if
       :: retries[r] < MAX_RETRY && ld != NONE ->  /* re-acquire, will re-send */
            retries[r]++; fst[r] = F_ACQ; send(ACQ, ld, ep, r, 0)
       :: else -> fst[r] = F_ERR; outcomes[r]++
       fi; settle()
#else
       printf("fe_give_up r=%d (no result)\n", r); fst[r] = F_ERR; outcomes[r]++
#endif
     }
#endif
  od
}

/* =====================================================================
 * Assigner (leader candidate) a.
 * ===================================================================== */
#define A_MSG(K) (MD(K) == a && (MT(K) == ACQ || MT(K) == READY || \
                  MT(K) == RELEASE || MT(K) == INV) && \
                  !(role[a] == RECONCILING && ME(K) == myep[a] && MT(K) != INV))

/* busy count of assigner a into i */
inline busy_count() {
  i = 0; j = 0;
  do
  :: j < NS -> if :: LT(a,j) == L_BUSY || (LT(a,j) == L_STARTING && LRQ(a,j) != NONE) -> i++ :: else fi; j++
  :: else -> break
  od;
  j = 0
}

inline wipe() {                 /* forget all in-memory leader state     */
  role[a] = FOLLOWER; myep[a] = 0; synced[a] = 0; pctr[a] = 0;
  j = 0;
  do
  :: j < NS -> LT(a,j) = L_NONE; LRQ(a,j) = 0; PN(a,j) = 0; j++
  :: else -> break
  od;
  j = 0;
  do
  :: j < NW -> wseen[a*NW+j] = 0; j++
  :: else -> break
  od;
  j = 0
}

/* journal txn guard (R3): does the leader key still carry my revision? */
#ifdef MUTANT_UNFENCED_JOURNAL
#define TXN_OK (true)
#else
#define TXN_OK (ld == a && ep == myep[a])
#endif

/* mark sandbox j dead in journal and table; fail a waiting cold start */
inline sandbox_dead() {
  assert(ws[j] != W_BUSY);     /* property (f): never write off a running sandbox */
  jst[j] = J_DEAD;
  if
  :: LT(a,j) == L_STARTING && LRQ(a,j) != NONE -> send(FAIL, LRQ(a,j), 0, 0, 0)
  :: else
  fi;
  LT(a,j) = L_NONE; LRQ(a,j) = 0; touch(j)
}

/* may the probe answer in scratch (number mp) override sandbox S?      */
#if defined(MUTANT_STALE_PROBE)
#define PROBED(S) (true)
#elif defined(MUTANT_NO_PROBE_NUMBER)
#define PROBED(S) (mp != 0 && PN(a,S) != 0)              /* any probe (F3 only) */
#else
#define PROBED(S) (mp != 0 && PN(a,S) == mp)             /* the latest one (F4) */
#endif

/* F3: the leader changed sandbox S itself: a probe answer in flight is
 * older than that change and must not override it */
inline touch(S) { PN(a,S) = 0 }

/* property (i), the herd bound: at most MAX_STARTING sandboxes start at once */
inline herd_check() {
  n = 0; k = 0;
  do
  :: k < NS -> if :: LT(a,k) == L_STARTING -> n++ :: else fi; k++
  :: else -> break
  od;
  assert(n <= MAX_STARTING);
  n = 0; k = 0
}

/* n = 1 when a lease for sandbox S may still start an invocation: a GRANT
 * for S whose frontend still waits for one, or an INVOKE for S, under an
 * epoch the worker does not fence (>= its wmax) */
inline lease_out(S) {
  n = 0; k = 0;
  do
  :: k < nn ->
       if
       :: MX(k) == S && ME(k) >= wmax[jw[S]] &&
          ((MT(k) == GRANT && fst[MD(k)] == F_ACQ) || (MT(k) == INVOKE && MD(k) == jw[S])) -> n = 1
       :: else
       fi; k++
  :: else -> break
  od;
  k = 0
}

/* a new probe: its number (F4), modulo PMOD */
inline new_probe() { pctr[a] = pctr[a] % PMOD + 1 }

/* message handler of assigner a for the message in scratch mt..my */
inline a_handle() {
  if
  :: role[a] == FOLLOWER || me != myep[a] ->             /* a_discard_stale */
       printf("a_discard_stale a=%d t=%d ep=%d\n", a, mt, me)
  :: else ->
     if
     /* ---- a_acquire(request mx) ------------------------------------ */
     :: mt == ACQ ->
          j = 0;                                           /* idempotency */
          do
          :: j < NS && !((LT(a,j) == L_BUSY || LT(a,j) == L_STARTING) && LRQ(a,j) == mx) -> j++
          :: else -> break
          od;
          if
          :: j < NS && LT(a,j) == L_BUSY ->             /* same grant again */
               printf("a_acquire_again a=%d r=%d s=%d\n", a, mx, j); send(GRANT, mx, myep[a], j, 0)
          :: j < NS && LT(a,j) == L_STARTING -> skip      /* the grant follows READY */
          :: else ->
             busy_count();
             if
             :: i >= RC -> printf("a_throttle a=%d r=%d\n", a, mx); send(FAIL, mx, 0, 1, 0)
             :: else ->
                j = 0;
                do
                :: j < NS && LT(a,j) != L_IDLE -> j++
                :: else -> break
                od;
                if
                :: j < NS ->                               /* a_grant_idle */
                     printf("a_grant_idle a=%d r=%d s=%d ep=%d\n", a, mx, j, myep[a]);
                     LT(a,j) = L_BUSY; LRQ(a,j) = mx; touch(j); send(GRANT, mx, myep[a], j, 0)
                :: else ->
                     j = 0;                                 /* a pre-warm nobody waits for? */
                     do
                     :: j < NS && !(LT(a,j) == L_STARTING && LRQ(a,j) == NONE) -> j++
                     :: else -> break
                     od;
                     if
                     :: j < NS ->                           /* a_claim_prewarm: wait for it */
                          printf("a_claim_prewarm a=%d r=%d s=%d\n", a, mx, j);
                          LRQ(a,j) = mx; touch(j)
                     :: else ->
                     j = 0;
                     do
                     :: j < NS && jst[j] != J_NONE -> j++
                     :: else -> break
                     od;
                     if
                     :: j == NS -> printf("a_no_capacity a=%d r=%d\n", a, mx); send(FAIL, mx, 0, 0, 0)
                     :: else ->                             /* a_cold_start */
                          placement();
                          if
                          :: TXN_OK ->                      /* journal: created on W */
                               printf("a_cold_start a=%d r=%d s=%d w=%d ep=%d\n", a, mx, j, i, myep[a]);
                               jst[j] = J_LIVE; jw[j] = i; jinc[j] = winc[i];
                               LT(a,j) = L_STARTING; LRQ(a,j) = mx;
                               send(START, i, myep[a], j, jinc[j]);  /* F2 */
                               herd_check()
                          :: else -> wipe()                 /* txn failed: deposed */
                          fi
                     fi
                     fi
                fi
             fi
          fi
     /* ---- a_sandbox_ready(sandbox mx) -------------------------------- */
     :: mt == READY ->
          if
          :: LT(a,mx) == L_STARTING && LRQ(a,mx) == NONE ->  /* a pre-warm: idle */
               printf("a_sandbox_ready a=%d s=%d idle (pre-warm)\n", a, mx);
               LT(a,mx) = L_IDLE; touch(mx)
          :: LT(a,mx) == L_STARTING && LRQ(a,mx) != NONE ->
               printf("a_sandbox_ready a=%d s=%d grant r=%d\n", a, mx, LRQ(a,mx));
               LT(a,mx) = L_BUSY; touch(mx); send(GRANT, LRQ(a,mx), myep[a], mx, 0)
          :: LT(a,mx) != L_STARTING && jst[mx] != J_LIVE ->   /* started after it was declared dead */
               printf("a_destroy_orphan a=%d s=%d\n", a, mx); send(DESTROY, jw[mx], myep[a], mx, 0)
          :: else
          fi
     /* ---- a_release(sandbox mx, request my) --------------------------- */
     :: mt == RELEASE ->
          if
          :: LT(a,mx) == L_BUSY && (LRQ(a,mx) == my || LRQ(a,mx) == NONE) ->
               printf("a_release a=%d s=%d r=%d\n", a, mx, my);
               LT(a,mx) = L_IDLE; LRQ(a,mx) = NONE; touch(mx)
          :: LT(a,mx) == L_NONE && jst[mx] != J_LIVE ->      /* written off while it ran */
               printf("a_destroy_orphan a=%d s=%d\n", a, mx); send(DESTROY, jw[mx], myep[a], mx, 0)
          :: else
          fi
     /* ---- a_inventory(worker mx, idle|busy<<3 my): reconcile / probe -- */
     :: mt == INV ->
          printf("a_inventory a=%d w=%d idle=%d busy=%d probe=%d\n", a, mx, my & 7, my >> 3, mp);
          j = 0;
          do
          :: j < NS ->
               if
               :: jw[j] == mx && jst[j] == J_LIVE && (role[a] == RECONCILING || PROBED(j)) ->
                    touch(j);
                    if
                    :: (my >> j) & 1 ->                     /* idle on the worker */
                         if
                         :: LT(a,j) == L_STARTING && LRQ(a,j) == NONE -> LT(a,j) = L_IDLE
                         :: LT(a,j) == L_STARTING && LRQ(a,j) != NONE ->  /* READY was lost */
                              LT(a,j) = L_BUSY; send(GRANT, LRQ(a,j), myep[a], j, 0)
                         :: else -> LT(a,j) = L_IDLE; LRQ(a,j) = NONE
                         fi
                    :: (my >> (j+3)) & 1 ->                 /* busy on the worker */
                         if
                         :: LT(a,j) != L_BUSY -> LT(a,j) = L_BUSY; LRQ(a,j) = NONE
                         :: else
                         fi
                    :: else ->                               /* gone: sandbox_failed */
                         if
                         :: TXN_OK -> sandbox_dead()
                         :: else -> wipe(); break
                         fi
                    fi
               :: jw[j] == mx && jst[j] != J_LIVE && ((my >> j) & 1 || (my >> (j+3)) & 1) ->
                    send(DESTROY, mx, myep[a], j, 0)        /* orphan on the worker */
               :: else
               fi;
               j++
          :: else -> break
          od;
          if
          :: role[a] == RECONCILING ->
               synced[a] = synced[a] | (1 << mx);
               if
               :: synced[a] == 3 ->                          /* a_start_serving */
                    printf("a_start_serving a=%d ep=%d\n", a, myep[a]);
                    role[a] = SERVING;
                    if :: serving_ep < myep[a] -> serving_ep = myep[a] :: else fi
               :: else
               fi
          :: else
          fi
     fi
  fi
}

/* placement: least-loaded worker (live sandboxes in the journal), ties to
 * the lower id; result in i.  Deterministic to keep the model small.    */
inline placement() {
  i = 0; n = 0;                 /* i: live on w0, n: live on w1          */
  k = 0;
  do
  :: k < NS -> if :: jst[k] == J_LIVE && jw[k] == 0 -> i++
                  :: jst[k] == J_LIVE && jw[k] == 1 -> n++
                  :: else fi; k++
  :: else -> break
  od;
  i = (n < i -> 1 : 0); n = 0; k = 0
}

#define A_OPT(K) :: d_step { A_MSG(K) -> take(K); a_handle(); clear_scratch() }

/* R13: which sandboxes the eviction policy may pick */
#ifdef MUTANT_EVICT_GRANTED
#define EVICTABLE(S) (LT(a,S) == L_IDLE || LT(a,S) == L_BUSY)
#else
#define EVICTABLE(S) (LT(a,S) == L_IDLE)
#endif
/* ---- a_evict(S): the keep-alive policy (expiry or memory budget) evicts
 *      sandbox S: journal it dead (fenced, R3), then DESTROY (R13) ------- */
#define EVICT_OPT(S) :: d_step { evicts < MAX_EVICT && role[a] == SERVING && EVICTABLE(S) -> \
       evicts++; j = S; printf("a_evict a=%d s=%d w=%d ep=%d\n", a, j, jw[j], myep[a]); \
       if \
       :: TXN_OK -> \
            EVICT_CHECK;  /* property (h): not busy, no lease outstanding */ \
            jst[j] = J_DEAD; LT(a,j) = L_NONE; LRQ(a,j) = 0; touch(j); \
            send(DESTROY, jw[j], myep[a], j, 0) \
       :: else -> wipe() \
       fi; clear_scratch() }
/* (h) never evict a sandbox that runs an invocation or has a lease
 * outstanding.  -DNO_EVICT_CHECK leaves (h) out: with early timers the
 * protocol breaks it (F7, README), and the runs that need early timers and
 * evictions for something else (property (g)) check everything but (h) */
#ifdef NO_EVICT_CHECK
#define EVICT_CHECK skip
#else
#define EVICT_CHECK assert(ws[j] != W_BUSY); lease_out(j); assert(n == 0); n = 0
#endif

/* R14: when a pre-warm may start (Assigner.tick R7: nothing idle, starting
 * or in flight; this keeps the herd bound) */
#ifdef MUTANT_PREWARM_HERD
#define PREWARM_OK (true)
#else
#define PREWARM_OK (LT(a,0) == L_NONE && LT(a,1) == L_NONE && LT(a,2) == L_NONE)
#endif

proctype Assigner(byte a) {
end:
  do
  /* ---- a_campaign: win the free leader key, read journal, reconcile --- */
  :: d_step { ld == NONE && role[a] == FOLLOWER ->
       ep++; ld = a; myep[a] = ep;
       printf("a_campaign a=%d wins ep=%d\n", a, ep);
       j = 0;
       do
       :: j < NS -> if :: jst[j] == J_LIVE -> LT(a,j) = L_IDLE :: else -> LT(a,j) = L_NONE fi;
                    LRQ(a,j) = NONE; j++
       :: else -> break
       od;
       wseen[a*NW+0] = winc[0]; wseen[a*NW+1] = winc[1];
#ifdef MUTANT_NO_RECONCILE
       role[a] = SERVING; if :: serving_ep < myep[a] -> serving_ep = myep[a] :: else fi;
#else
       role[a] = RECONCILING; synced[a] = 0;
       send(SYNC, 0, myep[a], a, 0); send(SYNC, 1, myep[a], a, 0);
#endif
       clear_scratch() }
  /* ---- a_step_down: keepalive fails, the assigner learns it is deposed - */
  :: d_step { role[a] != FOLLOWER && !(ld == a && ep == myep[a]) ->
       printf("a_step_down a=%d ep=%d\n", a, myep[a]); wipe() }
  /* ---- a_resync: reconciliation timer, re-send SYNC to silent workers -- */
  :: d_step { timeout && role[a] == RECONCILING ->
       printf("a_resync a=%d\n", a);
       if :: !(synced[a] & 1) -> send(SYNC, 0, myep[a], a, 0) :: else fi;
       if :: !(synced[a] & 2) -> send(SYNC, 1, myep[a], a, 0) :: else fi; settle() }
#ifndef MUTANT_NO_PROBE
  /* ---- a_timed_out: probe the workers of sandboxes believed BUSY or
   *      STARTING; their inventory is the truth (F3, F4) ------------------ */
  :: d_step { TIMER && role[a] == SERVING &&
       (LT(a,0) == L_BUSY || LT(a,0) == L_STARTING ||
        LT(a,1) == L_BUSY || LT(a,1) == L_STARTING ||
        LT(a,2) == L_BUSY || LT(a,2) == L_STARTING) ->
       timer_fired(); new_probe(); printf("a_timed_out a=%d probe=%d\n", a, pctr[a]);
       i = 0; j = 0;
       do
       :: j < NS -> if :: LT(a,j) == L_BUSY || LT(a,j) == L_STARTING ->
                          i = i | (1 << jw[j]); PN(a,j) = pctr[a]
                       :: else fi; j++
       :: else -> break
       od;
       if :: i & 1 -> sendp(SYNC, 0, myep[a], a, 0, pctr[a]) :: else fi;
       if :: i & 2 -> sendp(SYNC, 1, myep[a], a, 0, pctr[a]) :: else fi;
       i = 0; j = 0; settle() }
#ifndef MUTANT_NO_FULL_PROBE
  /* ---- a_full_probe: the periodic anti-entropy timer probes EVERY worker
   *      about EVERY sandbox in the table; orphans get DESTROY (F5).  The
   *      model lets it fire only while a worker or the journal disagrees
   *      with the table (DIVERGED): a firing when all agree changes nothing
   *      but probe numbers, and an unguarded `timeout` timer could fire
   *      forever at quiescence, a spurious cycle for the LTL runs -------- */
  :: d_step { TIMER && role[a] == SERVING && DIVERGED(a) ->
       timer_fired(); new_probe(); printf("a_full_probe a=%d probe=%d\n", a, pctr[a]);
       j = 0;
       do
       :: j < NS -> if :: LT(a,j) != L_NONE -> PN(a,j) = pctr[a] :: else fi; j++
       :: else -> break
       od;
       sendp(SYNC, 0, myep[a], a, 0, pctr[a]); sendp(SYNC, 1, myep[a], a, 0, pctr[a]);
       j = 0; settle() }
#endif
#endif
  /* ---- a_worker_restarted: the etcd watch shows a new incarnation of a
   *      worker's session key: all its sandboxes are gone (sandbox_exited) */
  :: d_step { role[a] != FOLLOWER &&
              (wseen[a*NW+0] != winc[0] || wseen[a*NW+1] != winc[1]) ->
       i = (wseen[a*NW+0] != winc[0] -> 0 : 1);
       wseen[a*NW+i] = winc[i];
       printf("a_worker_restarted a=%d w=%d\n", a, i);
       if
       :: TXN_OK ->
            j = 0;
            do
            :: j < NS -> if :: jst[j] == J_LIVE && jw[j] == i && jinc[j] != winc[i] -> sandbox_dead() :: else fi; j++
            :: else -> break
            od
       :: else -> wipe()                                    /* txn failed: deposed */
       fi;
       clear_scratch() }
  /* ---- a_evict: R13, any idle sandbox at any time ------------------------ */
  EVICT_OPT(0) EVICT_OPT(1) EVICT_OPT(2)
  /* ---- a_prewarm: R14, start a sandbox for no request -------------------- */
  :: d_step { prewarms < MAX_PREWARM && role[a] == SERVING && PREWARM_OK &&
              (jst[0] == J_NONE || jst[1] == J_NONE || jst[2] == J_NONE) ->
       prewarms++;
       j = 0;
       do
       :: j < NS && jst[j] != J_NONE -> j++
       :: else -> break
       od;
       placement();
       if
       :: TXN_OK ->
            printf("a_prewarm a=%d s=%d w=%d ep=%d\n", a, j, i, myep[a]);
            jst[j] = J_LIVE; jw[j] = i; jinc[j] = winc[i];
            LT(a,j) = L_STARTING; LRQ(a,j) = NONE; touch(j);
            send(START, i, myep[a], j, jinc[j]);
            herd_check()
       :: else -> wipe()
       fi;
       clear_scratch() }
  /* ---- message handlers (any slot, any order) -------------------------- */
  SLOTS(A_OPT)
  od
}

/* =====================================================================
 * Worker w (source of truth, R8/R9).
 * ===================================================================== */
#define W_MSG(K) (MD(K) == w && (MT(K) == INVOKE || MT(K) == START || \
                  MT(K) == SYNC || MT(K) == DESTROY))

inline w_finish(S) {
  printf("w_finish s=%d r=%d\n", S, wr[S]);
  ws[S] = W_IDLE; running[S]--; nrun--;
  send(RESULT, wr[S], 0, 0, 0);
  if :: ld != NONE -> send(RELEASE, ld, ep, S, wr[S]) :: else fi;   /* to whoever leads now */
  wr[S] = 0; settle()
}

#ifdef MUTANT_ACCEPT_BUSY
#define IDLE_CHECK (true)
#else
#define IDLE_CHECK (ws[mx] == W_IDLE)
#endif
#ifdef MUTANT_NO_INCARNATION
#define INC_CHECK (true)
#else
#define INC_CHECK (my == winc[w])     /* F2: START is for this incarnation */
#endif
#ifdef MUTANT_DESTROY_ANY
#define DESTROY_CHECK (ws[mx] != W_ABSENT)
#else
#define DESTROY_CHECK (ws[mx] == W_IDLE)   /* H4: only an idle sandbox */
#endif
#ifdef MUTANT_NO_FENCING
#define FENCE_CHECK (true)
#else
#define FENCE_CHECK (me >= wmax[w])
#endif

inline w_handle() {
  if
  /* ---- w_invoke(sandbox mx, lease epoch me, request my) --------------- */
  :: mt == INVOKE ->
       if
       :: jw[mx] == w && ws[mx] != W_ABSENT && IDLE_CHECK && FENCE_CHECK ->  /* w_accept */
            printf("w_accept w=%d s=%d r=%d ep=%d wmax=%d\n", w, mx, my, me, wmax[w]);
            if :: me > wmax[w] -> wmax[w] = me :: else fi;
            ws[mx] = W_BUSY; wr[mx] = my;
            running[mx]++; nrun++; runs[my]++;
            assert(running[mx] <= 1);               /* property (a) */
            assert(nrun <= RC);                     /* property (b) */
            assert(runs[my] <= 1);                  /* property (c) */
            assert(me >= serving_ep)                /* property (d) */
       :: else -> printf("w_reject w=%d s=%d r=%d ep=%d wmax=%d\n", w, mx, my, me, wmax[w]);
            send(FAIL, my, 0, 0, 0)            /* w_reject */
       fi
  /* ---- w_start(sandbox mx, epoch me, incarnation my) ------------------ */
  :: mt == START ->
       if
       :: me >= wmax[w] && INC_CHECK ->
            printf("w_start w=%d s=%d ep=%d\n", w, mx, me);
            wmax[w] = me;
            if :: ws[mx] == W_ABSENT -> ws[mx] = W_IDLE :: else fi;
            if :: ld != NONE -> send(READY, ld, ep, mx, 0) :: else fi   /* to whoever leads now */
       :: else -> printf("w_start_fenced w=%d s=%d ep=%d\n", w, mx, me)
       fi
  /* ---- w_sync(epoch me, from assigner mx): report the inventory ------- */
  :: mt == SYNC ->
       if
       :: me >= wmax[w] ->
            wmax[w] = me;
            i = 0; j = 0;
            do
            :: j < NS -> if
                         :: jw[j] == w && ws[j] == W_IDLE -> i = i | (1 << j)
                         :: jw[j] == w && ws[j] == W_BUSY -> i = i | (1 << (j+3))
                         :: else
                         fi; j++
            :: else -> break
            od;
            printf("w_sync w=%d to a=%d ep=%d probe=%d\n", w, mx, me, mp);
            sendp(INV, mx, me, w, i, mp)                   /* echo the probe number (F4) */
       :: else
       fi
  /* ---- w_destroy(sandbox mx, epoch me) -------------------------------- */
  :: mt == DESTROY ->
       if
       :: me >= wmax[w] && jw[mx] == w && DESTROY_CHECK ->
            printf("w_destroy w=%d s=%d\n", w, mx);
            assert(running[mx] == 0);   /* property (g): no invocation vanishes with its sandbox */
            if :: ws[mx] == W_BUSY -> running[mx]--; nrun--; wr[mx] = 0 :: else fi;
            ws[mx] = W_ABSENT
       :: else
       fi
  fi
}

#define W_OPT(K) :: d_step { W_MSG(K) -> take(K); w_handle(); clear_scratch() }

proctype Worker(byte w) {
end:
  do
  SLOTS(W_OPT)
  /* ---- w_finish: the invocation in sandbox s ends: result + release --- */
  :: d_step { jw[0] == w && ws[0] == W_BUSY -> w_finish(0) }
  :: d_step { jw[1] == w && ws[1] == W_BUSY -> w_finish(1) }
  :: d_step { jw[2] == w && ws[2] == W_BUSY -> w_finish(2) }
  od
}

/* =====================================================================
 * Environment: faults (bounded).
 * ===================================================================== */
inline lease_expiry() { lfaults++; i = ld; ld = NONE; printf("f_lease_expiry a=%d\n", i) }

inline worker_crash(W) {        /* restart empty, re-read epoch (R8)      */
  wfaults++; printf("f_worker_crash w=%d\n", W);
  j = 0;
  do
  :: j < NS -> if
               :: jw[j] == W && ws[j] != W_ABSENT ->
                    if :: ws[j] == W_BUSY -> running[j]--; nrun-- :: else fi;
                    ws[j] = W_ABSENT; wr[j] = 0
               :: else
               fi; j++
  :: else -> break
  od;
  winc[W]++;
  wmax[W] = ep;
  j = 0
}

#define DROP_OPT(K) :: d_step { drops < MAX_DROP && net[K] != 0 -> drops++;\
  printf("f_drop t=%d d=%d e=%d x=%d y=%d p=%d\n", MT(K), MD(K), ME(K), MX(K), MY(K), MP(K)); remove(K); settle() }

active proctype Env() {
end:
  do
  /* ---- f_leader_crash: the leader crashes (memory wiped); its etcd lease
   *      expires and frees the leader key -------------------------------- */
  :: d_step { lfaults < MAX_LFAULT && ld != NONE ->
       lease_expiry(); printf("f_leader_crash a=%d\n", i);
       role[i] = FOLLOWER; myep[i] = 0; synced[i] = 0; pctr[i] = 0;
       j = 0;
       do
       :: j < NS -> lt[i*NS+j] = L_NONE; lrq[i*NS+j] = 0; pnum[i*NS+j] = 0; j++
       :: else -> break
       od;
       wseen[i*NW+0] = 0; wseen[i*NW+1] = 0;
       i = 0; j = 0 }
  /* ---- f_leader_pause: the leader is paused or partitioned away; its
   *      lease expires but it keeps acting on stale memory until it
   *      notices (a_step_down) -------------------------------------------- */
  :: d_step { lfaults < MAX_LFAULT && ld != NONE -> lease_expiry(); printf("f_leader_pause a=%d\n", i); i = 0 }
  /* ---- f_worker_crash ------------------------------------------------- */
  :: d_step { wfaults < MAX_WFAULT -> worker_crash(0) }
  :: d_step { wfaults < MAX_WFAULT -> worker_crash(1) }
  /* ---- f_drop: the network loses one message --------------------------- */
  SLOTS(DROP_OPT)
  od
}

/* =====================================================================
 * Initial configuration: 2 frontends (F0 issues R0 and R1, F1 issues R2),
 * 2 assigners competing for the leader key, 2 workers.
 * ===================================================================== */
init {
  atomic {
    j = 0;
    do :: j < NS -> jw[j] = NONE; lrq[j] = NONE; lrq[NS+j] = NONE; j++ :: else -> break od;
    j = 0;
#ifndef INITIAL_ELECTION
    /* Start from a settled cluster: assigner 0 won epoch 1, reconciled
     * (every worker has seen epoch 1) and serves; no sandbox exists yet.
     * -DINITIAL_ELECTION starts instead with both assigners campaigning. */
    ep = 1; ld = 0; myep[0] = 1; role[0] = SERVING; synced[0] = 3;
    wmax[0] = 1; wmax[1] = 1; serving_ep = 1;
#endif
    run Assigner(0); run Assigner(1);
    run Worker(0); run Worker(1);
    i = 0;
    do :: i < NR -> run Frontend(i); i++ :: else -> break od;
    i = 0
  }
}

/* =====================================================================
 * Properties (LTL).  Safety (a)-(d) and (f)-(i) are the asserts above:
 * (g) at w_destroy, (h) at a_evict, (i) in herd_check.
 * ===================================================================== */
#define DONE(r) (fst[r] == F_OK || fst[r] == F_ERR || fst[r] == F_THR)
#if NR == 3
#define ALL_DONE (DONE(0) && DONE(1) && DONE(2))
#else
#define ALL_DONE (DONE(0) && DONE(1))
#endif

#define CONS_A(a) (ld == a && role[a] == SERVING && CONS(a,0) && CONS(a,1) && CONS(a,2))
#define CONSISTENT (CONS_A(0) || CONS_A(1))

/* (live) after the last fault every request completes or gets an error */
ltl p_live  { <> ALL_DONE }
/* (live-ok) a run without any fault or early timer ends with every
 * request answered OK or THROTTLED: errors only come from faults */
#define NOFAULT (lfaults == 0 && wfaults == 0 && drops == 0 && early == 0)
#if NR == 3
#define NO_ERR (fst[0] != F_ERR && fst[1] != F_ERR && fst[2] != F_ERR)
#else
#define NO_ERR (fst[0] != F_ERR && fst[1] != F_ERR)
#endif
ltl p_live_ok { <> (ALL_DONE && (NO_ERR || !NOFAULT)) }
/* (e) no leak: eventually the journal, the workers and the current
 * leader's table agree on every sandbox (no orphan sandbox, no journaled
 * ghost, no sandbox stuck BUSY in the table), and stay so */
ltl p_noleak { <> [] CONSISTENT }
