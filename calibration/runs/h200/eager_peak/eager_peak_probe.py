import gc,json,os,time,torch,transformers as T,peft
from vramcalc.calibrate.scenarios import Scenario,resolve
from vramcalc.calibrate.training import TrainingStep,build_on_device
from vramcalc import estimate
d=torch.device("cuda",0)
L=[dict(method="full",precision="mixed-bf16",grad_ckpt=True,attn="eager",batch_size=2,seq_len=4096),
   dict(method="full",precision="bf16",grad_ckpt=True,attn="eager",batch_size=2,seq_len=4096),
   dict(method="full",precision="mixed-bf16",grad_ckpt=False,attn="eager",batch_size=2,seq_len=4096)]
R={"torch":torch.__version__,"transformers":T.__version__,"peft":peft.__version__,"gpu":torch.cuda.get_device_name(0),
   "date":time.strftime("%FT%TZ",time.gmtime()),"rows":[]}
def frames(ev):
  out=[]
  for f in ev.get("frames",[]):
    fn=f.get("filename","")
    if any(k in fn for k in ("transformers/","vramcalc/","torch/utils/checkpoint","torch/nn/functional")):
      out.append(f"{fn.split('site-packages/')[-1]}:{f.get('line')} {f.get('name')}")
  return out[:4]
for o in L:
  try:
    sc=Scenario(model="smollm2-135m",options=o); sp,rs=resolve(sc)
    md=build_on_device(sp,rs,d); st=TrainingStep(md,sp,rs,d); st.run(); torch.cuda.synchronize()
    gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(d)
    base=torch.cuda.memory_allocated(d)
    torch.cuda.memory._record_memory_history(max_entries=400000,stacks="python")
    st.run(); torch.cuda.synchronize()
    snap=torch.cuda.memory._snapshot(); torch.cuda.memory._record_memory_history(enabled=None)
    peak=torch.cuda.max_memory_allocated(d)
    live={}; cur=0; best=-1; at=None
    for ev in snap["device_traces"][0]:
      a=ev["action"]
      if a=="alloc": live[ev["addr"]]=ev; cur+=ev["size"]
      elif a=="free_completed" and ev["addr"] in live: cur-=live.pop(ev["addr"])["size"]
      if cur>best: best=cur; at=sorted(live.values(),key=lambda e:-e["size"])[:14]
    est=estimate("smollm2-135m",**o)
    r={"id":sc.id,"baseline_allocated":base,"max_allocated":peak,"step_delta_peak":best,
       "est_peak_tensor":est.peak_tensor_bytes,"est_phase":est.phase,
       "top_live_at_peak":[[e["size"],frames(e)] for e in at]}
    del st,md; gc.collect(); torch.cuda.empty_cache()
  except Exception as e: r={"id":str(o),"error":repr(e)[:400]}
  R["rows"].append(r); print(json.dumps(r)[:1500])
open(os.environ["OUT"]+"/eager_peak.json","w").write(json.dumps(R,indent=1))
