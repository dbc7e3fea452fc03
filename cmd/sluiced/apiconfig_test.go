package main

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// The clientset asks for the content type the flag names: protobuf by
// default, JSON when told (client-go would otherwise pick protobuf for
// built-in types on its own, which made a JSON run measure protobuf).
func TestCoreConfigContentType(t *testing.T) {
	for flag, want := range map[string]string{
		"application/vnd.kubernetes.protobuf": "application/vnd.kubernetes.protobuf,application/json",
		"application/json":                    "application/json",
	} {
		var mu sync.Mutex
		var accept string
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			accept = r.Header.Get("Accept")
			mu.Unlock()
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(`{"kind":"NodeList","apiVersion":"v1","items":[]}`))
		}))
		cs, err := kubernetes.NewForConfig(coreConfig(&rest.Config{Host: srv.URL}, flag))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := cs.CoreV1().Nodes().List(t.Context(), metav1.ListOptions{}); err != nil {
			t.Fatal(err)
		}
		srv.Close()
		mu.Lock()
		if accept != want {
			t.Errorf("--kube-api-content-type=%s: Accept %q, want %q", flag, accept, want)
		}
		mu.Unlock()
	}
}
