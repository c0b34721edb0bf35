import gc,json,os,time,statistics as S,torch,transformers as T,peft
from vramcalc.calibrate.scenarios import Scenario,resolve
from vramcalc.calibrate.training import TrainingStep,build_on_device
d=torch.device("cuda",0)
L=[("smollm2-135m",dict(method="lora",batch_size=1,seq_len=256),6),
("tinyllama-1.1b",dict(method="lora",precision="mixed-bf16",attn="eager",batch_size=1,seq_len=256,lora_targets="all-linear"),6),
("llama-3.1-8b",dict(method="full",batch_size=1,seq_len=256),6),
("smollm2-135m",dict(method="full",precision="mixed-bf16",grad_ckpt=True,attn="eager",batch_size=8,seq_len=8192),3)]
R={"torch":torch.__version__,"transformers":T.__version__,"peft":peft.__version__,"date":time.strftime("%FT%TZ",time.gmtime()),"rows":[]}
def issue(st):
  for _ in range(st.setup.grad_accum):
    with st.autocast(): l=st.loss()
    (l/st.setup.grad_accum).backward(); del l
  st.optimizer.step(); st.optimizer.zero_grad(set_to_none=True)
for m,o,n in L:
  try:
    sc=Scenario(model=m,options=o); sp,rs=resolve(sc)
    md=build_on_device(sp,rs,d); st=TrainingStep(md,sp,rs,d); st.run(); torch.cuda.synchronize()
    gc.collect(); torch.cuda.empty_cache(); W=[];I=[]
    for _ in range(n):
      t=time.perf_counter(); issue(st); I.append(time.perf_counter()-t); torch.cuda.synchronize(); W.append(time.perf_counter()-t)
    r={"id":sc.id,"wall_s":W,"issue_s":I,"harness":sorted(W[:2])[1],"steady":S.median(W[1:])}
    del st,md; gc.collect(); torch.cuda.empty_cache()
  except Exception as e: r={"id":m,"error":repr(e)[:300]}
  R["rows"].append(r); print(json.dumps(r))
open(os.environ["OUT"]+"/step_timing.json","w").write(json.dumps(R,indent=1))
