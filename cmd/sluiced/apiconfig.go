package main

import (
	"k8s.io/client-go/rest"
)

// coreConfig is the API configuration of the clientset for core objects.
// Protobuf is about a third of JSON's size on the wire and cheaper to
// decode, on both ends; every agent watches every Node and Pod, so this is
// the bulk of what the API server sends a cluster's agents. The Calico and
// dynamic clients keep JSON: custom resources have no protobuf encoding.
//
// The informers need nothing more to be cheap: client-go (1.35 and later)
// streams their initial state with WatchList (the WatchListClient feature
// gate, on by default; it falls back to a paged LIST on servers without
// it), and after a dropped watch the reflector resumes from the last
// resourceVersion it saw, relisting only when the server has compacted it
// away (410 Gone).
//
// JSON must be asked for explicitly: client-go's generated clients use
// protobuf for built-in types whenever the configuration leaves the
// content type unset (Request.UseProtobufAsDefault), so a config left
// unset for "application/json" still got protobuf.
func coreConfig(rc *rest.Config, contentType string) *rest.Config {
	c := rest.CopyConfig(rc)
	switch contentType {
	case "":
	case "application/json":
		c.ContentType, c.AcceptContentTypes = contentType, contentType
	default:
		c.ContentType = contentType
		c.AcceptContentTypes = contentType + ",application/json"
	}
	return c
}
