import gc,json,os,time,statistics as S,contextlib,torch
from vramcalc.calibrate.scenarios import Scenario,resolve
from vramcalc.calibrate.training import TrainingStep,build_on_device
from vramcalc.calibrate.probes import Nvml,NvmlSampler
d=torch.device("cuda",0); nv=Nvml.open(0); print("nvml",nv is not None)
L=[("smollm2-135m",dict(method="lora",batch_size=1,seq_len=256)),
("tinyllama-1.1b",dict(method="lora",precision="mixed-bf16",attn="eager",batch_size=1,seq_len=256,lora_targets="all-linear"))]
R=[]
for m,o in L:
  sc=Scenario(model=m,options=o); sp,rs=resolve(sc)
  md=build_on_device(sp,rs,d); st=TrainingStep(md,sp,rs,d); st.run(); st.run(); torch.cuda.synchronize()
  r={"id":sc.id}
  for rep in range(2):
    for name in ("off","on"):
      W=[]
      cm=NvmlSampler(nv,os.getpid()) if name=="on" else contextlib.nullcontext()
      with cm:
        for _ in range(8):
          t=time.perf_counter(); st.run(); torch.cuda.synchronize(); W.append(time.perf_counter()-t)
      r.setdefault(name,[]).extend(W)
  r["median_off"]=S.median(r["off"]); r["median_on"]=S.median(r["on"])
  R.append(r); print(json.dumps({k:v for k,v in r.items() if k.startswith(("id","median"))}))
  del st,md; gc.collect(); torch.cuda.empty_cache()
open(os.environ["OUT"]+"/nvml_sampler.json","w").write(json.dumps(R,indent=1))
