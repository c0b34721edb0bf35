import gc,json,os,time,torch
from torch.profiler import profile,ProfilerActivity as A
from vramcalc.calibrate.scenarios import Scenario,resolve
from vramcalc.calibrate.training import TrainingStep,build_on_device
d=torch.device("cuda",0)
L=[("qwen3-0.6b",dict(method="lora",grad_ckpt=True,attn="eager",batch_size=4,seq_len=1024)),
("qwen3-0.6b",dict(method="full",precision="mixed-bf16",batch_size=4,seq_len=1024))]
R=[]
for m,o in L:
  sc=Scenario(model=m,options=o); sp,rs=resolve(sc)
  md=build_on_device(sp,rs,d); st=TrainingStep(md,sp,rs,d); st.run(); st.run(); torch.cuda.synchronize()
  W=[]
  for _ in range(5):
    t=time.perf_counter(); st.run(); torch.cuda.synchronize(); W.append(time.perf_counter()-t)
  with profile(activities=[A.CPU,A.CUDA]) as p:
    st.run(); torch.cuda.synchronize()
  k=[e for e in p.events() if e.device_type==torch.autograd.DeviceType.CUDA]
  r={"id":sc.id,"cuda_events":len(k),"gpu_s":sum(e.device_time_total for e in k)/1e6,"wall_s":W,
     "norm_kernels":sum(1 for e in k if "rsqrt" in e.name.lower())}
  R.append(r); print(json.dumps(r))
  del st,md; gc.collect(); torch.cuda.empty_cache()
open(os.environ["OUT"]+"/profile_qwen3.json","w").write(json.dumps(R,indent=1))
