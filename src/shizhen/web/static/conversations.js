"use strict";
/* Consultations kept in this browser (IndexedDB: photos are hundreds of kilobytes, too big for localStorage).
   A conversation is {id, created, updated, model, title, messages: [{role, text, image?, meta?, error?}]}.
   Where IndexedDB is unavailable (some private modes) the page still works; nothing is kept. */
const conversations = (() => {
  const opened = new Promise((resolve, reject) => {
    const request = indexedDB.open("shizhen", 1);
    request.onupgradeneeded = () => request.result.createObjectStore("conversations", { keyPath: "id" });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  opened.catch(() => {});  // each use below reports its own failure

  function run(mode, work) {
    return opened.then((db) => new Promise((resolve, reject) => {
      const transaction = db.transaction("conversations", mode);
      const request = work(transaction.objectStore("conversations"));
      transaction.oncomplete = () => resolve(request.result);
      transaction.onerror = () => reject(transaction.error);
      transaction.onabort = () => reject(transaction.error);
    }));
  }

  return {
    /** All conversations, the most recently updated first. */
    async list() {
      const all = await run("readonly", (store) => store.getAll());
      return all.sort((a, b) => b.updated - a.updated);
    },
    save: (conversation) => run("readwrite", (store) => store.put(conversation)),
    remove: (id) => run("readwrite", (store) => store.delete(id)),
  };
})();
