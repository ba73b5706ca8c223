/* Differential driver for tools/ref/tokenizer_diff.py: tokenizes each
 * NUL-separated text of FILE with add_special (and parse_special when a third
 * argument is given) and prints "rc id id ..." per text.
 * usage: tokenizer_diff_driver VOCAB.gguf FILE [special] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "io/gguf.h"
#include "model/tokenizer.h"
int main(int argc,char**argv){struct moe_diag d={0};struct moe_gguf*g;struct moe_tokenizer*t=NULL;
moe_gguf_open(&g,argv[1],&d); if(moe_tokenizer_load(&t,g,&d)){printf("%s\n",d.msg);return 1;} moe_gguf_close(g);
FILE*f=fopen(argv[2],"rb"); static char buf[1<<20]; size_t L=fread(buf,1,sizeof buf,f); size_t p=0;
static int32_t ids[1<<20];
while(p<L){ size_t n=strlen(buf+p); size_t k; int rc=moe_tokenize(t,buf+p,n,true,argc>3,ids,1<<20,&k); printf("%d",rc); for(size_t i=0;i<k;i++)printf(" %d",ids[i]); printf("\n"); p+=n+1;}
moe_tokenizer_free(t);}
