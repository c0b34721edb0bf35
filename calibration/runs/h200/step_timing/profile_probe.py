import gc,json,os,torch
from torch.profiler import profile,ProfilerActivity as A
from vramcalc.calibrate.scenarios import Scenario,resolve
from vramcalc.calibrate.training import TrainingStep,build_on_device
d=torch.device("cuda",0)
L=[("smollm2-135m",dict(method="lora",batch_size=1,seq_len=256)),
("smollm2-135m",dict(method="full",precision="mixed-bf16",grad_ckpt=True,attn="eager",batch_size=8,seq_len=8192))]
R=[]
for m,o in L:
  sc=Scenario(model=m,options=o); sp,rs=resolve(sc)
  md=build_on_device(sp,rs,d); st=TrainingStep(md,sp,rs,d); st.run(); st.run(); torch.cuda.synchronize()
  with profile(activities=[A.CPU,A.CUDA]) as p:
    st.run(); torch.cuda.synchronize()
  k=[e for e in p.events() if e.device_type==torch.autograd.DeviceType.CUDA]
  ops=[e for e in p.events() if e.device_type==torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]
  top=sorted(p.key_averages(),key=lambda e:-e.self_device_time_total)[:14]
  r={"id":sc.id,"cuda_events":len(k),"gpu_s":sum(e.device_time_total for e in k)/1e6,"aten_ops_all_levels":len(ops),
     "top":[[e.key[:90],e.count,round(e.self_device_time_total/1e6,4)] for e in top]}
  R.append(r); print(json.dumps(r))
  del st,md; gc.collect(); torch.cuda.empty_cache()
open(os.environ["OUT"]+"/profile.json","w").write(json.dumps(R,indent=1))
