package l4aegistls_test

import (
	"crypto/tls"
	"sync"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
)

func TestRegistry(t *testing.T) {
	a, b := certID(t), certID(t)
	if l4aegistls.Lookup(a) != nil {
		t.Fatal("Lookup of an id never registered is not nil")
	}
	srcA := l4aegistls.NewStaticCert(newCert(t, "a.test"))
	srcB := l4aegistls.NewStaticCert(newCert(t, "b.test"))
	l4aegistls.Register(a, srcA)
	l4aegistls.Register(b, srcB)
	if l4aegistls.Lookup(a) != srcA || l4aegistls.Lookup(b) != srcB {
		t.Fatal("Lookup does not return what was registered")
	}
	l4aegistls.Register(a, srcB)
	if l4aegistls.Lookup(a) != srcB {
		t.Fatal("Register does not replace")
	}
	l4aegistls.Unregister(a)
	l4aegistls.Unregister(a) // twice is fine
	if l4aegistls.Lookup(a) != nil || l4aegistls.Lookup(b) != srcB {
		t.Fatal("Unregister removed the wrong id")
	}
	l4aegistls.Register(b, nil)
	if l4aegistls.Lookup(b) != nil {
		t.Fatal("Register(id, nil) does not unregister")
	}
}

func TestStaticCert(t *testing.T) {
	c1, c2 := newCert(t, "one.test"), newCert(t, "two.test")
	s := l4aegistls.NewStaticCert(c1)
	if got, err := s.GetCertificate(&tls.ClientHelloInfo{ServerName: "other.test"}); got != c1 || err != nil {
		t.Fatalf("GetCertificate = %p, %v; want the stored certificate whatever the name", got, err)
	}
	s.Store(c2)
	if got, _ := s.GetCertificate(nil); got != c2 || s.Load() != c2 {
		t.Fatal("Store did not replace the certificate")
	}
	s.Store(nil)
	if got, err := s.GetCertificate(nil); got != nil || err == nil {
		t.Fatalf("empty StaticCert: got %p, %v; want an error", got, err)
	}
}

// Lookups race with writers without locks (run with -race).
func TestRegistryConcurrent(t *testing.T) {
	ids := []int64{certID(t), certID(t), certID(t)}
	src := l4aegistls.NewStaticCert(newCert(t, "c.test"))
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				for _, id := range ids {
					if s := l4aegistls.Lookup(id); s != nil && s != src {
						t.Errorf("Lookup(%d) returned a source never registered", id)
					}
				}
			}
		}()
	}
	for i := range 2000 {
		id := ids[i%len(ids)]
		if i%2 == 0 {
			l4aegistls.Register(id, src)
		} else {
			l4aegistls.Unregister(id)
		}
	}
	close(stop)
	wg.Wait()
}
