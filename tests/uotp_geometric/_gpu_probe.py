import torch, numpy as np, time
from uotp_geometric import UOTAggregation
from torch_geometric.nn.aggr import SoftmaxAggregation
from torch_geometric.utils import scatter
torch.manual_seed(0)
B=1000; N=1_000_000; D=256
index=torch.repeat_interleave(torch.arange(B),torch.full((B,),N//B)).cuda()
ptr=torch.arange(0,N+1,N//B).cuda()
x=torch.randn(N,D,device='cuda')
def t(f, r=20):
    for _ in range(3): f()
    ts=[]
    for _ in range(r):
        s=torch.cuda.Event(enable_timing=True); e=torch.cuda.Event(enable_timing=True)
        s.record(); f(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return np.median(ts)
ib=index.view(-1,1).expand_as(x)
print('exp', t(lambda: x.exp()))
print('scatter_add_', t(lambda: x.new_zeros(B,D).scatter_add_(0, ib, x)))
print('index_add_', t(lambda: x.new_zeros(B,D).index_add_(0, index, x)))
print('segment_reduce sum', t(lambda: torch.segment_reduce(x,'sum',offsets=ptr,axis=0)))
print('segment_reduce max', t(lambda: torch.segment_reduce(x,'max',offsets=ptr,axis=0)))
print('scatter amax', t(lambda: x.new_zeros(B,D).scatter_reduce_(0, ib, x, 'amax', include_self=False)))
csr=torch.sparse_csr_tensor(ptr, torch.arange(N,device='cuda'), torch.ones(N,device='cuda'), size=(B,N))
print('csr mm', t(lambda: csr @ x))
print('view sum (uniform sets)', t(lambda: x.view(B,N//B,D).sum(1)))
print('index_select', t(lambda: x.new_zeros(B,D).index_select(0,index)))
xg=x.clone().requires_grad_(True)
for name,m in [('softmax',SoftmaxAggregation(learn=True)),('sinkhorn',UOTAggregation(num_iters=4)),('sinkhorn_plain',UOTAggregation(num_iters=4,memory_efficient=False))]:
    m=m.cuda()
    try:
        c=torch.compile(m)
        print(name,'eager',t(lambda: m(xg,index,dim_size=B).sum().backward(),10),'compiled',t(lambda: c(xg,index,dim_size=B).sum().backward(),10), flush=True)
    except Exception as e: print(name,'compile failed',repr(e)[:300])
