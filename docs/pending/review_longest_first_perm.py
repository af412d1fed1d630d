"""Review evidence for docs/pending/bwd_longest_first.patch (review_epilogue_longest_first.md, part 2): a host
emulation of the sm90a backward's order pass on random calls (empty sequences, lying cu_seqlens, huge max_seqlen_k,
seqused_k, windows, bad key-list counts), checking that the order is a permutation of the grid's CTAs and that each
CTA's work equals the old grid's. A scratch check kept as written by the review; run: python3 <this file>."""
import random, itertools
KMAX=16384; TR=64; TK=128; NB=64
def units(B,Hk,tk,mk):
    keys=min(mk,tk)
    if B<=0 or Hk<=0 or keys<=0: return 0
    pairs=B*Hk
    if pairs>KMAX: return 0
    tiles=(keys+TK-1)//TK
    return pairs*tiles if pairs*tiles<=KMAX else 0
def coords(B,Hk,u):
    pair=u%(B*Hk); tile=u//(B*Hk); return pair%Hk, pair//Hk, tile
def clamp(cu,b,total,mx):
    s=cu[b]; e=cu[b+1]
    s=0 if s<0 else (total if s>total else s)
    e=s if e<s else (total if e>total else e)
    l=e-s; return s, (mx if l>mx else l)
def cdiv(a,b):  # C truncating division for ints
    q=abs(a)//abs(b); return q if (a>=0)==(b>=0) else -q
class Call:
    def __init__(s,r):
        s.B=r.choice([1,2,3,5,8,17,64,128,300,1000,r.randint(1,4000)])
        s.Hk=r.choice([1,2,4,8]); s.group=r.choice([1,2,4])
        s.tq=r.randint(0,5000); s.tk=r.randint(0,5000)
        lens=[r.choice([0,0,1,63,64,65,127,128,129,r.randint(0,3000)]) for _ in range(s.B)]
        def cu(total):
            c=[0]
            for l in lens: c.append(c[-1]+l)
            if r.random()<0.3:  # lying
                for i in range(len(c)):
                    if r.random()<0.2: c[i]=r.randint(-100,total+500)
            return c
        s.cuq=cu(s.tq); s.cuk=cu(s.tk)
        s.mq=r.choice([max(lens+[0]),r.randint(0,6000),10**12])
        s.mk=min(r.choice([max(lens+[0]),r.randint(0,6000),10**12, 1]), s.tk)  # make_params clamps
        s.mq=min(s.mq,s.tq)
        s.seqused=[r.randint(-5,3000) for _ in range(s.B)] if r.random()<0.2 else None
        s.wl=r.choice([-1,-1,0,5,100,1000]); s.wr=r.choice([-1,0,0,3,100])
        s.lists=r.random()<0.4
        if s.lists:
            s.hm=r.choice([h for h in (1,s.Hk,s.Hk*s.group) if (s.Hk*s.group)%h==0])
            s.count={(b,l):r.randint(-3,3500) for b in range(s.B) for l in range(s.hm)}
            s.listpos={}
    def seq(s,b):
        qs,ql=clamp(s.cuq,b,s.tq,s.mq); ks,kl=clamp(s.cuk,b,s.tk,s.mk)
        if s.seqused is not None:
            u=s.seqused[b]; kl=0 if u<0 else min(u,kl)
        return qs,ql,ks,kl
    def slots(s,b,h,kl):
        if not s.lists: return None,kl
        l=h//((s.Hk*s.group)//s.hm)
        n=s.count[(b,l)]; n=0 if n<0 else min(n,kl)
        return (b,l),n
    def pos(s,lst,c,kl):
        if lst is None: return c
        key=(lst,c)
        if key not in s.listpos: s.listpos[key]=random.randint(-10,kl+10)
        v=s.listpos[key]; return max(0,min(v,kl-1)) if kl>0 else 0
    def key_tile(s,b,hk,tile):
        qs,ql,ks,kl=s.seq(b); lst,n=s.slots(b,hk*s.group,kl)
        c0=tile*TK; keys=min(TK,n-c0)
        if keys<=0: return (c0,keys,(0,0),0)
        lo=s.pos(lst,c0,kl); hi=s.pos(lst,c0+keys-1,kl)
        shift=kl-ql
        beg=0 if s.wr<0 else max(0,lo-shift-s.wr)
        end=ql if s.wl<0 else min(ql,hi-shift+s.wl+1)
        t=cdiv(end-beg+TR-1,TR) if end>beg else 0
        return (c0,keys,(beg,end),t)
    # old kernel code, verbatim logic
    def old_cta(s,b,hk,tile):
        qs,ql,ks,kl=s.seq(b); lst,n=s.slots(b,hk*s.group,kl)
        c0=tile*TK
        if c0>=n: return None
        keys=min(TK,n-c0)
        lo=s.pos(lst,c0,kl); hi=s.pos(lst,c0+keys-1,kl); shift=kl-ql
        beg=0 if s.wr<0 else max(0,lo-shift-s.wr)
        end=ql if s.wl<0 else min(ql,hi-shift+s.wl+1)
        t=cdiv(end-beg+TR-1,TR) if end>beg else 0
        if t*s.group==0: return None
        return (c0,keys,(beg,end),t)
def order_longest_first(n,count_of,r,threads=1024,per=16):
    assert n<=threads*per
    cnt={}
    for i in range(per):
        for t in range(threads):
            u=t+i*threads
            if u<n: cnt[u]=count_of(u); assert cnt[u]>=0
    longest=max(cnt.values(),default=0); width=longest+1
    bucket={u:NB-1-(c*NB//width) for u,c in cnt.items()}
    assert all(0<=v<NB for v in bucket.values())
    cin=[0]*NB
    for u in bucket: cin[bucket[u]]+=1
    first=list(itertools.accumulate([0]+cin[:-1]))
    order=[None]*n
    us=list(bucket); r.shuffle(us)   # atomics in any order
    for u in us:
        order[first[bucket[u]]]=u; first[bucket[u]]+=1
    return order,cnt
r=random.Random(1)
stats=dict(calls=0,ordered=0,ctas=0,nonempty=0)
for it in range(3000):
    c=Call(r); random.seed(it)
    U=units(c.B,c.Hk,c.tk,c.mk)
    stats['calls']+=1
    # grid-mode set of CTAs doing work (launcher: key_tiles from p.f.max_seqlen_k)
    key_tiles=cdiv(c.mk+TK-1,TK) if c.mk>0 else 0
    grid={}
    for b in range(c.B):
        for hk in range(c.Hk):
            for tile in range(key_tiles):
                w=c.old_cta(b,hk,tile)
                if w is not None: grid[(hk,b,tile)]=w
    if U==0: continue
    stats['ordered']+=1
    order,cnt=order_longest_first(U,lambda u: c.key_tile(*(lambda hk,b,t:(b,hk,t))(*coords(c.B,c.Hk,u)))[3],r)
    assert sorted(order)==list(range(U)), "not a permutation"
    # descending by bucket
    bs=[NB-1-(cnt[u]*NB//(max(cnt.values())+1)) for u in order]; assert bs==sorted(bs)
    ordered={}
    for x in range(U):  # kernel: blockIdx.x in [0,U)
        hk,b,tile=coords(c.B,c.Hk,order[x])
        assert 0<=hk<c.Hk and 0<=b<c.B
        kt=c.key_tile(b,hk,tile)
        if kt[3]*c.group==0: continue
        assert (hk,b,tile) not in ordered
        ordered[(hk,b,tile)]=kt
    assert ordered==grid, (set(ordered)^set(grid))
    stats['ctas']+=U; stats['nonempty']+=len(ordered)
print(stats)
